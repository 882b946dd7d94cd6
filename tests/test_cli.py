"""CLI conventions: --version, --help everywhere, AffeqError → one line on stderr and exit 1."""

from __future__ import annotations

import subprocess
import sys

from affeq_rt import __version__
from affeq_rt.cli.main import COMMANDS, app, main


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"affeq-rt {__version__}"


def test_help_for_every_registered_command(capsys) -> None:
    names = [c.name for c in app.registered_commands]
    assert "info" in names
    for name in names:
        assert main([name, "--help"]) == 0, name
        assert "Usage" in capsys.readouterr().out


def test_all_planned_commands_are_registered() -> None:
    names = {c.name for c in app.registered_commands}
    assert names == {name for _, name in COMMANDS}


def test_info_lists_backends(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend cpu" in out
    assert "backend cuda" in out


def test_user_error_is_one_line_without_traceback() -> None:
    # A command that reaches an AffeqError: predict with an unknown model name.
    proc = subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "predict", "no-such-model",
                           __file__], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
