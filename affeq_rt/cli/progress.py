"""The CLI's one progress display: rich on stderr, implementing :class:`affeq_rt.progress.Progress`.

Counted tasks get a bar with the count, items/s (resumed items excluded) and ETA; steps of unknown
length get a transient spinner with elapsed time. Nothing is drawn with ``--quiet`` or when
stderr is not a terminal, so pipes and logs stay clean.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


class Display:
    """A :class:`affeq_rt.progress.Progress` drawn with rich on stderr; use as a context manager
    (leaving it stops whatever is drawn, also on errors)."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = not quiet and self.console.is_terminal
        self._live: RichProgress | None = None
        self._task: Any = None
        self._counted = False
        self._name = ""
        self._t0 = 0.0
        self._resumed = 0

    # -- the Progress protocol -------------------------------------------------------------
    def start(self, task: str, total: int | None = None, done: int = 0,
              unit: str = "img") -> None:
        """A counted task begins: a bar with count, rate and ETA (a spinner if total is None)."""
        self._stop()
        self._t0, self._resumed, self._counted = time.perf_counter(), done, True
        self._name = task
        if not self.enabled:
            return
        self._live = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self._live.start()
        self._task = self._live.add_task(task, total=total, completed=done, rate=f"- {unit}/s",
                                         unit=unit)

    def advance(self, n: int = 1) -> None:
        """``n`` more items of the current task are done."""
        if self._live is None or not self._counted:
            return
        t = self._live.tasks[0]
        dt = time.perf_counter() - self._t0
        rate = (t.completed + n - self._resumed) / dt if dt > 0 else 0.0
        self._live.update(self._task, advance=n, rate=f"{rate:.1f} {t.fields['unit']}/s")

    def done(self) -> None:
        """The current task finished (its final bar stays on screen; a spinner disappears)."""
        self._stop()

    def step(self, message: str) -> None:
        """A step of unknown length: a transient spinner with elapsed time shows ``message``
        (inside a counted task, the message joins the bar's description instead)."""
        if not self.enabled:
            return
        if self._live is not None and self._counted:  # a note inside the counted task
            self._live.update(self._task, description=f"{self._name}: {message}")
            return
        if self._live is not None:
            self._live.update(self._task, description=message)
            return
        self._stop()
        self._live = RichProgress(SpinnerColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), console=self.console, transient=True)
        self._live.start()
        self._task = self._live.add_task(message, total=None)

    # -- conveniences ----------------------------------------------------------------------
    def note(self, message: str) -> None:
        """A line that stays (on stderr), printed above any live display; dropped when quiet."""
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
        self._live, self._task, self._counted = None, None, False

    def __enter__(self) -> Display:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()
