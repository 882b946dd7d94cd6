"""The ``affeq-rt`` command line: one module per command, all thin wrappers over library calls.

Shared options live in :mod:`affeq_rt.cli.options`, the one progress display in
:mod:`affeq_rt.cli.progress`; :mod:`affeq_rt.cli.main` registers the commands.
"""
