"""The package version, written once (pyproject reads it with a regex provider)."""

__version__ = "0.1.0"
