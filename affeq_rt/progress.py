"""The progress protocol: the library reports long work through it; the CLI draws it (rich).

Library functions take ``progress: Progress | None``; ``None`` means silent. One object can
report several tasks in turn (``start`` … ``advance`` … ``done``) and free-form steps (``step``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """What long-running library calls report to."""

    def start(self, task: str, total: int | None = None, done: int = 0,
              unit: str = "img") -> None:
        """A counted task begins (``total`` None: unknown length); ``done`` items are resumed."""

    def advance(self, n: int = 1) -> None:
        """``n`` more items of the current task are done."""

    def done(self) -> None:
        """The current task finished."""

    def step(self, message: str) -> None:
        """A step of unknown length begins (e.g. "exporting features.onnx")."""


class Silent:
    """A :class:`Progress` that shows nothing (the default for library calls)."""

    def start(self, task: str, total: int | None = None, done: int = 0,
              unit: str = "img") -> None:
        """Ignore."""

    def advance(self, n: int = 1) -> None:
        """Ignore."""

    def done(self) -> None:
        """Ignore."""

    def step(self, message: str) -> None:
        """Ignore."""


def or_silent(progress: Progress | None) -> Progress:
    """``progress`` itself, or a :class:`Silent` one when None."""
    return Silent() if progress is None else progress
