"""Stop signals of the command line: Ctrl-C, SIGTERM and SIGHUP, from the first instant on.

Imported first (by ``affeq_rt/__init__.py`` and :mod:`affeq_rt.cli.main`): when this process is
the ``affeq-rt`` command line, a stop signal that arrives while the modules load (before any
command began) prints the one stop line and exits with 128 + the signal, instead of a
KeyboardInterrupt traceback from deep inside an import. :mod:`affeq_rt.cli.main` replaces these
handlers when it starts the command. A program that imports affeq_rt keeps its own handlers.
"""

from __future__ import annotations

import os
import signal
import sys

#: What a stop leaves: nothing half-written (files are written atomically); extract's store and
#: fit's checkpoint (with --out) keep the work done, so only those two resume.
RERUN = "rerun the same command (extract and fit resume where they stopped)"
INTERRUPTED_LINE = f"interrupted; {RERUN}"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_line(signum: int) -> str:
    """The one line a stop by ``signum`` prints."""
    if signum == signal.SIGINT:
        return INTERRUPTED_LINE
    return f"stopped by {signal.Signals(signum).name}; {RERUN}"


def _early_stop(signum: int, _frame: object) -> None:
    """A stop signal while the command line loads: nothing was begun, so say so and exit."""
    os.write(2, (stop_line(signum) + "\n").encode())
    os._exit(128 + signum)


def is_cli_process() -> bool:
    """Whether this process is the ``affeq-rt`` command line (not a program importing affeq_rt,
    nor a worker that multiprocessing's spawn started with the parent's ``sys.argv``)."""
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        return False
    argv = list(getattr(sys, "orig_argv", []))  # the interpreter's own command line
    if "-m" in argv[1:-1]:  # python -m affeq_rt[.cli.main]: sys.argv[0] is "-m" while it loads
        return argv[argv.index("-m", 1) + 1] in ("affeq_rt", "affeq_rt.cli.main")
    scripts = [a for a in argv[1:] if not a.startswith("-")][:1] or sys.argv[:1]
    return bool(scripts) and os.path.basename(scripts[0]) == "affeq-rt"


_INSTALLED = False


def install_early() -> None:
    """Install :func:`_early_stop` for every stop signal, once, in the command-line process."""
    global _INSTALLED
    if _INSTALLED or not is_cli_process():
        return
    _INSTALLED = True
    for s in STOP_SIGNALS:
        signal.signal(s, _early_stop)


install_early()
