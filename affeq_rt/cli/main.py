"""Entry point of the ``affeq-rt`` typer app: registers every command; AffeqError → one line."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from affeq_rt._version import __version__
from affeq_rt.errors import AffeqError

app = typer.Typer(
    name="affeq-rt",
    help="Affine feature equivalence of pretrained CNNs: export, fit, evaluate, build hybrids.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, command name): each module defines ``run`` (a typer command function).
COMMANDS: list[tuple[str, str]] = [
    ("info", "info"),
    ("models", "models"),
    ("export", "export"),
    ("predict", "predict"),
    ("extract", "extract"),
    ("fit", "fit"),
    ("evaluate", "evaluate"),
    ("validate", "validate"),
    ("demo", "demo"),
    ("build_hybrid", "build-hybrid"),
    ("inspect", "inspect"),
    ("serve", "serve"),
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


def _register() -> None:
    for module, name in COMMANDS:
        if importlib.util.find_spec(f"{__package__}.{module}") is None:
            continue  # command not built yet
        mod = importlib.import_module(f"{__package__}.{module}")
        app.command(name=name, help=mod.run.__doc__)(mod.run)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; AffeqError becomes ``error: ...`` on stderr and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except AffeqError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:  # pragma: no cover - click usage errors
        return int(e.code or 0)
    except Exception as e:  # click.UsageError and friends
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
