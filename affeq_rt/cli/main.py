"""Entry point of the ``affeq-rt`` typer app: registers every command and maps outcomes to exits.

Exit codes: 0 success (or the command's own code), 1 user error (``AffeqError``: one line
``error: …`` on stderr), 2 usage error (click's message), 70 a bug (traceback plus a request to
report it), 130 interrupted (Ctrl-C), 143/129 stopped by SIGTERM/SIGHUP (the same clean stop).

A signal while the modules load (the first fraction of a second) ends the process with the same
one line and code, before any command began (:mod:`affeq_rt.cli.signals`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import errno
import functools
import os
import signal
import sys
import traceback
from collections.abc import Callable
from inspect import getdoc
from types import ModuleType
from typing import Any

import typer

from affeq_rt._version import __version__
from affeq_rt.cli import (
    ablate,
    build_hybrid,
    cam,
    demo,
    depth,
    evaluate,
    export,
    extract,
    fit,
    info,
    inspect,
    layers,
    models,
    predict,
    serve,
    similarity,
    validate,
)
from affeq_rt.cli.signals import INTERRUPTED_LINE as INTERRUPTED_LINE
from affeq_rt.cli.signals import STOP_SIGNALS, stop_line
from affeq_rt.errors import AffeqError
from affeq_rt.io.terminal import printable

EXIT_USER = 1
EXIT_USAGE = 2
EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h)
EXIT_INTERRUPTED = 130
BUG_LINE = "this is a bug in affeq-rt; please report it with the command you ran"

app = typer.Typer(
    name="affeq-rt",
    help="Affine feature equivalence of pretrained CNNs: export, fit, evaluate, build hybrids.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, command name): each module defines ``run`` (a typer command function).
COMMANDS: list[tuple[ModuleType, str]] = [
    (info, "info"),
    (models, "models"),
    (export, "export"),
    (predict, "predict"),
    (extract, "extract"),
    (fit, "fit"),
    (evaluate, "evaluate"),
    (validate, "validate"),
    (demo, "demo"),
    (build_hybrid, "build-hybrid"),
    (inspect, "inspect"),
    (serve, "serve"),
    (cam, "cam"),
    (ablate, "ablate"),
    (layers, "layers"),
    (similarity, "similarity"),
    (depth, "depth"),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"affeq-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """affeq-rt command line."""


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a silent exit)."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be, so every clean-up
    that handles Ctrl-C (worker pools, checkpoints, temporary files) handles these alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Stop signals received during the current :func:`main` (typer turns a KeyboardInterrupt
#: outside a command into a silent exit code 130, so the signal is remembered here).
_RECEIVED: list[int] = []


def _on_stop(signum: int, _frame: object) -> None:
    _RECEIVED.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def _install_stop_handlers() -> dict[int, object] | None:
    """Ctrl-C as KeyboardInterrupt, SIGTERM/SIGHUP as :class:`Stopped`; returns the handlers
    they replace (None off the main thread, where signals cannot be handled)."""
    _RECEIVED.clear()
    try:
        return {s: signal.signal(s, _on_stop) for s in STOP_SIGNALS}
    except ValueError:
        return None


def _stop_code() -> tuple[int, str]:
    """(exit code, line) of a stop: 130 for Ctrl-C (or a KeyboardInterrupt raised without a
    signal), 128 + the signal for SIGTERM/SIGHUP."""
    signum = _RECEIVED[0] if _RECEIVED else int(signal.SIGINT)
    return 128 + signum, stop_line(signum)


def _interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with KeyboardInterrupt re-raised as :class:`_Interrupted` (same signature)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Interrupted from e
    return run


def _short_help(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line (the command list)."""
    first = " ".join(doc.split("\n\n")[0].split())
    head, sep, _ = first.partition(". ")
    return head + "." if sep else first


def add_command(name: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as command ``name`` (Ctrl-C inside it exits 130 with one line)."""
    doc = getdoc(fn) or ""
    app.command(name=name, help=doc, short_help=_short_help(doc))(_interruptible(fn))


for _mod, _name in COMMANDS:
    add_command(_name, _mod.run)


def _is_usage_error(e: BaseException) -> bool:
    """click's (or typer's vendored click's) ClickException: it can show itself, has a code."""
    return callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int)


def _usage_line(e: BaseException) -> str:
    """A click usage error as one line: its message and where the command's help is."""
    msg = " ".join(str(getattr(e, "format_message", lambda: str(e))()).split())
    ctx = getattr(e, "ctx", None)
    where = getattr(ctx, "command_path", None) or "affeq-rt"
    return f"{msg.rstrip('.')}; see {where} --help"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (see the module docstring for the mapping).

    As the program (``argv`` None) a run stopped by a signal ends at once after its clean-up:
    the atexit handlers run and the streams are flushed, then the process exits without the
    interpreter's own teardown of every loaded module (0.3-0.45 s with torch and onnxruntime
    loaded, most of a stop on a busy machine; the committed state is already on disk)."""
    previous = _install_stop_handlers()
    try:
        code = _main(argv)
    finally:
        for s, h in (previous or {}).items():
            signal.signal(s, h)  # type: ignore[arg-type]
    if argv is None and _RECEIVED:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Exit with ``code`` after the atexit handlers and a flush of stdout/stderr, skipping the
    interpreter's module teardown."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream
            stream.flush()
    os._exit(code)


def _stopped() -> int:
    """Print the stop line; its exit code."""
    code, line = _stop_code()
    typer.echo(line, err=True)
    return code


def _app_for(args: list[str]) -> typer.Typer:
    """The app that runs ``args``: when they start with a command's name, ``app`` with that one
    command (typer then builds one command's options from its signature, not all of them: issue
    25's start-up); otherwise ``app`` itself (the command list, click's "No such command")."""
    if args and not args[0].startswith("-"):
        for info in app.registered_commands:
            if info.name == args[0]:
                one = copy.copy(app)  # same callback and settings, the commands list replaced
                one.registered_commands = [info]
                return one
    return app


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = _app_for(args)(args=args, standalone_mode=False, prog_name="affeq-rt")
    except (_Interrupted, KeyboardInterrupt, typer.Abort):
        return _stopped()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER)
    except Exception as e:
        # a stop signal came first: whatever it broke (an import, a pool) is the stop
        return _stopped() if _RECEIVED else _failure(e)
    if _RECEIVED and rv == EXIT_INTERRUPTED:  # typer's own silent exit on a KeyboardInterrupt
        return _stopped()
    # standalone_mode=False: typer returns typer.Exit's code, or the command's return value
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def _failure(e: Exception) -> int:
    """Print a failed command's one line (or a bug's traceback); its exit code."""
    if isinstance(e, AffeqError):
        typer.secho(f"error: {printable(e)}", fg=typer.colors.RED, err=True)
        return EXIT_USER
    if _is_usage_error(e):  # usage errors: click's message, on one line
        typer.secho(f"error: {printable(_usage_line(e))}", fg=typer.colors.RED, err=True)
        return int(e.exit_code)  # type: ignore[attr-defined]
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # the user's path
        name = printable(e.filename if e.filename is not None else "a path")
        name = name if len(name) <= 120 else f"{name[:60]}…{name[-40:]}"
        typer.secho(f"error: {name} is longer than the file system allows; choose a "
                    "shorter path", fg=typer.colors.RED, err=True)
        return EXIT_USER
    # InternalError and anything unexpected: a bug, never dressed as a user error
    traceback.print_exception(e)
    typer.echo(BUG_LINE, err=True)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
