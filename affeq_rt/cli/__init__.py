"""The ``affeq-rt`` command line: one module per command, all thin wrappers over library calls."""
