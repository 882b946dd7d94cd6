"""scripts/gpu-check.sh --dry-run on a CPU machine: arguments, output layout, results schema.

Issue 15: the GPU check must be provably sound before a GPU is ever lent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"
STEPS = ["env", "build", "backends", "gpu-tests", "bench-gram", "bench-evaluate", "bench-extract",
         "bench-decode"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


results = _load("gpu_results")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script with ``args``; never inherits an $OUT from the caller."""
    base = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=240)


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One full dry run, its results folder given through $OUT."""
    out = tmp_path_factory.mktemp("gpu") / "out"
    return out, run("--dry-run", env={"OUT": str(out)})


def test_dry_run_layout_and_schema(dry: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, p = dry
    assert p.returncode == 0, p.stdout + p.stderr
    for f in ("results.json", "env.json", "backends.json", "run.json", "steps.tsv", "table.txt",
              "bench/gram.json", "bench/evaluate.json", "bench/extract.json",
              "bench/decode.json"):
        assert (out / f).is_file(), f
    doc = json.loads((out / "results.json").read_text())
    assert results.validate(doc) == []
    assert doc["dry_run"] is True
    assert doc["ok"] is True
    assert doc["problems"] == []
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert all(s["rc"] == 0 and not s["timed_out"] for s in doc["steps"])
    for s in doc["steps"]:
        assert (out / s["log"]).is_file(), s
    names = [r["name"] for r in doc["records"]]
    assert any(n.startswith("gram") for n in names)
    assert any(n.startswith("evaluate") for n in names)
    assert any(n.startswith("extract") for n in names)
    # the GPU decode part: in the dry run nvjpeg's own code with a libjpeg-turbo decode, so it
    # is timed against both CPU paths and its crops equal exact's (0 pixels differ)
    decode = {r["name"].split(": ", 1)[1]: r for r in doc["records"]
              if r["name"].startswith("decode")}
    assert decode["nvjpeg vs exact (CPU)"]["baseline"] > 0
    if importlib.util.find_spec("torchvision") is None:
        assert decode["nvjpeg vs exact (CPU)"]["notes"].startswith("not available: ")
    else:
        assert decode["nvjpeg vs exact (CPU)"]["value"] > 0
        agree = next(r for n, r in decode.items() if n.startswith("pixels differing from exact"))
        assert agree["value"] == 0.0
        assert "max level diff nvjpeg 0," in agree["notes"]
    assert all(r["unit"] != "error" for r in doc["records"]), doc["records"]
    # the table is printed last, then the pointer to the files
    tail = p.stdout.strip().splitlines()
    assert tail[-2] == "result: OK"
    assert "results.json" in tail[-1]


def test_markdown_section_from_results(dry: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = dry
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--markdown",
                        str(out / "results.json")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "| figure | value | baseline | ratio | unit | notes |" in p.stdout
    assert "DRY RUN" in p.stdout
    assert "Step exit statuses: env 0" in p.stdout


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--bogus"], {}, "unknown argument"),
    ([], {}, "--out DIR or $OUT"),
    (["--dry-run", "--timeout", "soon"], {"OUT": "{tmp}/o"}, "whole number"),
    (["--dry-run", "--wheels", "{tmp}/nowhere"], {"OUT": "{tmp}/o"}, "not a folder"),
    (["--dry-run", "--out", "{tmp}"], {}, "not empty"),
])
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str], env: dict[str, str],
                              message: str) -> None:
    (tmp_path / "x").write_text("earlier run")
    fill = [a.replace("{tmp}", str(tmp_path)) for a in args]
    p = run(*fill, env={k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()})
    assert p.returncode == 2, p.stderr
    assert message in p.stderr


def test_failures_and_timeouts_are_recorded_not_fatal(tmp_path: Path) -> None:
    """A wheels folder without the build pins fails the build step and a 1-second timeout kills
    the slow steps, yet every step runs, its status lands in a valid results.json, exit 1."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "pytest-9.0.0-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    p = run("--dry-run", "--timeout", "1", "--wheels", str(wheels), "--out", str(out))
    assert p.returncode == 1, p.stdout + p.stderr
    doc = json.loads((out / "results.json").read_text())
    assert results.validate(doc) == []
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert doc["ok"] is False
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["build"]["rc"] != 0
    assert "MISSING: no wheel for scipy-openblas32" in (out / steps["build"]["log"]).read_text()
    assert steps["bench-extract"]["timed_out"]
    assert steps["bench-extract"]["rc"] == 124
    assert any("build failed" in q for q in doc["problems"])
    assert p.stdout.strip().splitlines()[-2] == "result: FAILED"


def test_schema_rejects_bad_documents() -> None:
    rec = results.record("x", 2.0, "ms", 4.0)
    assert rec["ratio"] == 0.5
    assert results.validate_records([rec]) == []
    assert results.record("y", None, "img/s", 3.0)["ratio"] is None
    assert results.validate_records([{**rec, "value": "fast"}])
    assert results.validate_records([{k: v for k, v in rec.items() if k != "unit"}])
    assert results.validate_records([{**rec, "extra": 1}])
    assert results.validate_records([{**rec, "value": True}])  # a bool is not a number
    assert results.validate(None)
    assert results.validate({"schema": results.SCHEMA})


def test_budget_caps_the_whole_run(tmp_path: Path) -> None:
    """Once --budget is spent the remaining steps are recorded as timed out, not run."""
    out = tmp_path / "out"
    p = run("--dry-run", "--budget", "3", "--timeout", "2", "--out", str(out))
    assert p.returncode == 1
    doc = json.loads((out / "results.json").read_text())
    assert results.validate(doc) == []
    assert [s["name"] for s in doc["steps"]] == STEPS
    last = doc["steps"][-1]
    assert last["timed_out"]
    assert "budget" in (out / last["log"]).read_text()
    assert doc["options"]["budget"] == 3
