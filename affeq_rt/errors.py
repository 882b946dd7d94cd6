"""The project's two error types: a user error (one line: problem and fix) and a bug."""

from __future__ import annotations


class AffeqError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits 1, no traceback.

    Messages are one line: what is wrong, then what to do about it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class InternalError(RuntimeError):
    """An internal invariant broke: a bug in affeq-rt, not the user's input.

    The CLI prints the traceback and asks for a report; it never dresses a bug as a user error.
    """
