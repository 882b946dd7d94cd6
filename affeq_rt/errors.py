"""The project exception: a user error with one line naming the problem and the fix."""

from __future__ import annotations


class AffeqError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits 1, no traceback.

    Messages are one line: what is wrong, then what to do about it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
