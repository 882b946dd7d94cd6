"""A Progress (affeq_rt.progress protocol) that records every call, for tests of the library's
progress reports."""

from __future__ import annotations


class RecordingProgress:
    """Records ``("start", task, total, done, unit)``, ``("advance", n)``, ``("done",)`` and
    ``("step", message)`` in :attr:`calls`."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, task: str, total: int | None = None, done: int = 0,
              unit: str = "img") -> None:
        self.calls.append(("start", task, total, done, unit))

    def advance(self, n: int = 1) -> None:
        self.calls.append(("advance", n))

    def done(self) -> None:
        self.calls.append(("done",))

    def step(self, message: str) -> None:
        self.calls.append(("step", message))
