"""The ``affeq-rt`` command line: one module per command, all thin wrappers over library calls."""

from __future__ import annotations

from typing import Any


def spinner() -> Any:
    """A transient rich spinner with elapsed time on stderr, for steps of unknown length."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True))
