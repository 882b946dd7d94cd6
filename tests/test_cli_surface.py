"""One CLI surface: shared options spelled and explained alike, exit codes by outcome, the one
progress display, ``info``'s providers and ``models`` at 80 columns."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from rich.console import Console

from affeq_rt.cli.main import BUG_LINE, EXIT_BUG, INTERRUPTED_LINE, add_command, app, main
from affeq_rt.cli.options import EXPORT_ROOT_HELP
from affeq_rt.cli.progress import Display
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.onnx.runtime import loadable_providers
from affeq_rt.progress import Progress
from affeq_rt.registry.spec import list_specs

# Commands that export backbones (directly or on first use) and so take the export root.
EXPORTING = {"export", "predict", "extract", "fit", "build-hybrid", "demo"}
# Commands that run long enough to draw progress, so take --quiet.
LONG = EXPORTING | {"evaluate"}
SHARED = ("--export-root", "--provider", "--device", "--batch-size", "--workers",
          "--random-weights", "--labels", "--meta", "--max-images", "--quiet", "--json")


def _commands() -> dict[str, Any]:
    """The click commands typer builds from ``app`` (typer may vendor its own click)."""
    return dict(typer.main.get_command(app).commands)


def _options(cmd: Any, hidden: bool = False) -> dict[str, Any]:
    """Every visible (or also hidden) option of ``cmd`` by each of its spellings."""
    return {o: p for p in cmd.params if p.param_type_name == "option"
            and (hidden or not p.hidden) for o in p.opts}


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in _commands():
        assert main([name, "--help"]) == 0, name
        out = capsys.readouterr().out
        assert "Usage: affeq-rt" in out, name


def test_help_prints_brackets_and_groups_shared_options() -> None:
    """Help text is rich markup: an unescaped ``[ray]`` vanished from ``pip install
    'affeq-rt[ray]'``. Every option's help reaches the screen whole, and the shared options sit in
    their panels (images, networks, cluster) after the command's own."""
    env = {**os.environ, "COLUMNS": "400", "TERM": "dumb"}
    for name, cmd in _commands().items():
        out = subprocess.run([sys.executable, "-m", "affeq_rt", name, "--help"], env=env,
                             capture_output=True, text=True, check=True).stdout
        text = " ".join(out.split())
        for p in cmd.params:
            for word in (getattr(p, "help", None) or "").split():
                if "[" in word:  # a word with brackets: markup would eat them
                    assert word.replace("\\", "") in text, (name, p.name, word)
        if "--executor" in _options(cmd):
            assert "pip install 'affeq-rt[ray]'" in text, name
            assert out.index("Cluster (--executor ray)") > out.index("Options"), name
        if "--batch-size" in _options(cmd):
            assert out.index("--batch-size") > out.index("─ Images "), name


def test_shared_options_mean_the_same_everywhere() -> None:
    cmds = _commands()
    helps: dict[str, set[str]] = {}
    for name, cmd in cmds.items():
        opts = _options(cmd)
        for o in SHARED:
            if o in opts:
                helps.setdefault(o, set()).add(opts[o].help or "")
        # the export root has one name: never --out, always --export-root where exports happen
        if name in EXPORTING:
            assert "--export-root" in opts, name
            assert opts["--export-root"].help == EXPORT_ROOT_HELP, name
        if "--out" in opts:
            assert "export root" not in (opts["--out"].help or "").lower(), name
            assert "export cache" not in (opts["--out"].help or "").lower(), name
        if name in LONG:
            assert "--quiet" in opts, name
        # --json is a flag (print JSON) everywhere; --labels is a file everywhere
        if "--json" in opts:
            assert opts["--json"].is_flag, name
        if "--labels" in opts:
            assert not opts["--labels"].is_flag, name
        for p in cmd.params:
            assert "labeled" not in (getattr(p, "help", None) or "").lower(), (name, p.name)
        assert "labeled" not in (cmd.help or "").lower(), name
    assert helps["--export-root"] == {EXPORT_ROOT_HELP}
    for o in SHARED:
        assert len(helps.get(o, ())) <= 1, (o, helps.get(o))
    assert {"--json", "--labels", "--provider", "--workers"} <= set(helps)


def test_export_out_is_a_hidden_alias_only() -> None:
    cmd = _commands()["export"]
    assert "--out" not in _options(cmd)
    assert "--out" in _options(cmd, hidden=True)


def test_export_root_and_old_out_together_is_a_user_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "lite0", "--export-root", "a", "--out", "b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: both --export-root and --out")
    assert "\n" not in err


@pytest.fixture
def command() -> Iterator[Callable[[Callable[[], object]], str]]:
    """Register a throw-away command on the real app (the one ``main`` runs); removed after."""
    added: list[object] = []

    def add(fn: Callable[[], object]) -> str:
        name = f"surface-test-{len(added)}"
        add_command(name, fn)  # the way main registers every real command
        added.append(app.registered_commands[-1])
        return name

    yield add
    for c in added:
        app.registered_commands.remove(c)


def _raiser(exc: BaseException) -> Callable[[], None]:
    def run() -> None:
        raise exc
    return run


def test_user_error_exits_1_with_one_line(command, capsys: pytest.CaptureFixture[str]) -> None:
    name = command(_raiser(AffeqError("the thing is wrong", "do this")))
    assert main([name]) == 1
    err = capsys.readouterr().err
    assert err == "error: the thing is wrong; do this\n"


@pytest.mark.parametrize("exc", [InternalError("broken invariant"), ValueError("unexpected")])
def test_bug_exits_70_with_traceback(exc: Exception, command,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    name = command(_raiser(exc))
    assert main([name]) == EXIT_BUG == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert str(exc) in err
    assert err.rstrip().splitlines()[-1] == BUG_LINE
    assert "error: " not in err  # never dressed as a user error


def test_interrupt_exits_130_with_one_line(command, capsys: pytest.CaptureFixture[str]) -> None:
    name = command(_raiser(KeyboardInterrupt()))
    assert main([name]) == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [INTERRUPTED_LINE]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--no-such-option"]) == 2
    assert "No such option" in capsys.readouterr().err
    assert main(["export"]) == 2  # missing NAME
    assert "Missing argument" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


def test_command_exit_codes_are_honoured(command) -> None:
    def exits() -> None:
        raise typer.Exit(3)

    def returns() -> int:
        return 4

    assert main([command(exits)]) == 3
    assert main([command(returns)]) == 4


def test_exit_code_reaches_the_shell() -> None:
    proc = subprocess.run([sys.executable, "-m", "affeq_rt", "info", "--no-such-option"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_lists_providers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    provs = {p["name"]: p["loads"] for p in doc["providers"]}
    loads = loadable_providers()
    assert "CPUExecutionProvider" in loads
    for p in loads:  # every provider that really loads is listed as loading
        assert provs[p] is True, (p, provs)
    assert [b["name"] for b in doc["backends"]] == ["cpu", "cuda"]
    assert doc["versions"]["numpy"]
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "provider CPUExecutionProvider" in out
    assert "loads" in out


def test_models_at_80_columns_shows_every_full_name() -> None:
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "affeq_rt", "models"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    words = {w for ln in lines for w in ln.split()}
    for s in list_specs():
        assert s.name in words, s.name
        assert all(part in words for part in (s.paper_name or "").split()), s.paper_name
    assert "…" not in proc.stdout


def test_display_implements_the_protocol_and_draws_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with Display(console=console) as d:
        assert isinstance(d, Progress)
        d.start("extract", total=10, done=2)
        d.advance(3)
        d.done()
        d.step("exporting features.onnx")
        d.step("checking graphs")  # a second step reuses the spinner
    out = buf.getvalue()
    assert "extract" in out
    assert "5/10" in out
    assert "img/s" in out
    assert "checking graphs" in out


@pytest.mark.parametrize(("quiet", "terminal"), [(True, True), (False, False)])
def test_display_is_silent_when_quiet_or_not_a_terminal(quiet: bool, terminal: bool) -> None:
    buf = io.StringIO()
    with Display(quiet, console=Console(file=buf, force_terminal=terminal, width=120)) as d:
        d.start("extract", total=10)
        d.advance(10)
        d.step("x")
        d.note("a note")
        d.done()
    assert buf.getvalue() == ""


@pytest.fixture
def validate_store(tmp_path: Path) -> Path:
    """A labelled store of two networks: ``right`` classifies every image correctly, ``wrong``
    never does; both specs expect 100 % top-1."""
    from affeq_rt.demo.run import write_store
    from affeq_rt.io.store import ArrayStore

    k, n = 4, 40
    labels = np.arange(n, dtype=np.int64) % k
    x = np.eye(k, dtype=np.float32)[labels]  # one-hot features: logits W x + b have no ties
    eye = np.eye(k, dtype=np.float32)
    heads = {"right": (eye, np.zeros(k, np.float32)),
             "wrong": (np.roll(eye, 1, axis=0), np.zeros(k, np.float32))}  # predicts label + 1
    specs = {m: {"name": m, "label_offset": 0, "expected_top1": 100.0} for m in heads}
    return write_store(tmp_path / "store", ArrayStore({m: x for m in heads}, heads, labels, specs))


def test_validate_exit_code_and_json_flag(validate_store: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # 100 % expected: the binomial SE is 0, so the allowance is the 1-point --tolerance; "wrong"
    # is 100 points off (flagged), "right" 0 points off (ok) -- exact counts, no rounding at play.
    assert main(["validate", "-f", str(validate_store)]) == 1
    out = capsys.readouterr()
    assert "MISMATCH" in out.out
    assert "wrong" in out.err
    assert main(["validate", "-f", str(validate_store), "--models", "right"]) == 0
    capsys.readouterr()
    rows_file = tmp_path / "rows.json"
    assert main(["validate", "-f", str(validate_store), "--json", "--out", str(rows_file)]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["ok"], r["top1"]) for r in rows] == [("right", True, 100.0),
                                                               ("wrong", False, 0.0)]
    assert json.loads(rows_file.read_text()) == rows


def test_export_root_option_exports_there(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "mobilenetv2", "--random-weights", "--export-root",
                 str(tmp_path)]) == 0
    assert f"exported mobilenet_v2 to {tmp_path / 'mobilenet_v2'}" in capsys.readouterr().out
    assert (tmp_path / "mobilenet_v2" / "manifest.json").is_file()
