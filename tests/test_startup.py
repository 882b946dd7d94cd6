"""Start-up without torch (issue 25 item 4): ``--help`` and the commands that only run ONNX models
load neither torch nor timm, as ``python -X importtime`` shows; ``--help`` loads no NumPy, onnx or
onnxruntime either; ``import affeq_rt`` loads the library only when a name is used. (The times
themselves are a benchmark, bench/startup.py, never a timed test.)"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import affeq_rt

TORCH = {"torch", "torchvision", "timm"}
#: what --help must not load: the numerical stack and the frameworks (typer's own rich stays)
HEAVY = TORCH | {"numpy", "onnx", "onnxruntime", "PIL", "matplotlib", "scipy"}
#: what ``import affeq_rt`` itself loads of the package (the stop-signal handler first)
EAGER = {"affeq_rt", "affeq_rt._version", "affeq_rt.errors", "affeq_rt.cli", "affeq_rt.cli.signals"}
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$")


def imported(args: list[str]) -> tuple[set[str], str]:
    """``python -X importtime ARGS`` in a fresh interpreter (it must exit 0): every module it
    imported (importtime names each on its first import, during start-up too) and its stdout."""
    r = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.splitlines()
    assert r.returncode == 0, "\n".join(ln for ln in lines if not IMPORT_LINE.match(ln))[-2000:]
    return {m[1] for ln in lines if (m := IMPORT_LINE.match(ln))}, r.stdout


def tops(modules: set[str], of: set[str]) -> list[str]:
    """The modules whose top-level package is one of ``of``."""
    return sorted(m for m in modules if m.split(".")[0] in of)


# ------------------------------------------------------------------------------ --help


def test_help_of_every_command_loads_no_numpy_onnx_or_torch() -> None:
    """typer builds each command's --help from its signature alone: one process prints the
    command list and every command's help (the real entry point first, then each command)."""
    root, out = imported(["-m", "affeq_rt", "--help"])
    assert "predict" in out
    assert tops(root, HEAVY) == []
    code = ("import contextlib, io; from affeq_rt.cli.main import COMMANDS, main\n"
            "for _, name in COMMANDS:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert main([name, '--help']) == 0, name\n"
            "    assert 'Usage: affeq-rt ' + name in out.getvalue(), name\n"
            "print(len(COMMANDS))")
    every, out = imported(["-c", code])
    assert int(out) >= 17  # every command's help was built
    assert tops(every, HEAVY) == []


# ------------------------------------------------------------------------------ ONNX-only commands


@pytest.fixture(scope="module")
def onnx_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny export folder and a hybrid built from it (test_hybrid's TinyParts: torch runs here,
    in the test process, never in the commands), a photo, and a two-network labelled store with
    its fitted maps."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from PIL import Image
    from test_hybrid import TinyParts

    from affeq_rt.demo.run import write_store
    from affeq_rt.io.store import ArrayStore
    from affeq_rt.method.fit import fit

    base = tmp_path_factory.mktemp("startup")
    parts = TinyParts(base / "parts")
    hybrid = parts.build(base / "hybrid.onnx")
    photo = base / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    n, k = 96, 4
    labels = np.arange(n, dtype=np.int64) % k
    feats = {"a": np.eye(k, dtype=np.float32)[labels] + rng.normal(0, 0.3, (n, k)),
             "b": rng.normal(0, 1, (n, 6)).astype(np.float32)}
    feats = {m: x.astype(np.float32) for m, x in feats.items()}
    heads = {"a": (np.eye(k, dtype=np.float32), np.zeros(k, np.float32)),
             "b": (rng.normal(0, 1, (k, 6)).astype(np.float32), np.zeros(k, np.float32))}
    specs = {m: {"name": m, "label_offset": 0} for m in heads}
    store = write_store(base / "store", ArrayStore(feats, heads, labels, specs))
    maps = base / "maps.safetensors"
    fit(store, ["a", "b"], "ols", out=maps)
    return {"export": parts.a_exp.path, "hybrid": hybrid, "photo": photo, "store": store,
            "maps": maps, "report": base / "report"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter (fixture)
@pytest.mark.parametrize(("argv", "library"), [
    (["predict", "{export}", "{photo}"], "affeq_rt.deploy.predict"),
    (["predict", "{hybrid}", "{photo}", "--verify"], "affeq_rt.deploy.predict"),
    (["inspect", "{hybrid}"], "affeq_rt.deploy.metadata"),
    (["evaluate", "-f", "{store}", "--maps", "{maps}", "-o", "{report}"],
     "affeq_rt.report.write"),
    (["similarity", "-f", "{store}"], "affeq_rt.method.similarity"),
    (["validate", "-f", "{store}"], "affeq_rt.method.evaluate"),
    (["info"], "affeq_rt.onnx.runtime"),
], ids=["predict-export", "predict-hybrid", "inspect", "evaluate", "similarity", "validate",
        "info"])
def test_onnx_commands_load_neither_torch_nor_timm(argv: list[str], library: str,
                                                  onnx_inputs: dict[str, Path]) -> None:
    """Each command really runs (exit 0, output, its library module loaded) in a fresh ``python
    -X importtime -m affeq_rt``, and no torch, torchvision or timm module is among its imports."""
    mods, out = imported(["-m", "affeq_rt", *(a.format(**onnx_inputs) for a in argv)])
    assert out.strip()
    assert library in mods
    assert tops(mods, TORCH) == []


def test_serve_module_loads_neither_torch_nor_timm() -> None:
    """``serve`` blocks, so its library module stands in: importing it loads no torch/timm."""
    mods, _ = imported(["-c", "import affeq_rt.deploy.serve"])
    assert tops(mods, TORCH) == []


# ------------------------------------------------------------------------------ the lazy package


def test_import_affeq_rt_loads_no_library_module() -> None:
    mods, _ = imported(["-c", "import affeq_rt"])
    assert {m for m in mods if m.split(".")[0] == "affeq_rt"} == EAGER
    assert tops(mods, HEAVY) == []


def _type_checking_names() -> dict[str, tuple[str, str]]:
    """``affeq_rt/__init__.py``'s ``if TYPE_CHECKING:`` imports: {name: (module, attribute)}."""
    tree = ast.parse(Path(affeq_rt.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    return {a.asname or a.name: (node.module, a.name) for node in block.body
            if isinstance(node, ast.ImportFrom) for a in node.names}


def test_lazy_names_are_the_typed_imports_and_all_of_the_api() -> None:
    """The lazy table, the imports type checkers see and ``__all__`` name the same things, and
    each public name is the object ``from MODULE import ATTRIBUTE`` gives."""
    lazy = affeq_rt._LAZY
    assert _type_checking_names() == lazy
    eager = {"AffeqError", "InternalError", "__version__"}
    assert set(affeq_rt.__all__) == set(lazy) | eager
    assert set(affeq_rt.__all__) <= set(dir(affeq_rt))
    for name, (module, attr) in lazy.items():
        assert getattr(affeq_rt, name) is getattr(importlib.import_module(module), attr), name
    ns: dict[str, object] = {}
    exec("from affeq_rt import *", ns)  # noqa: S102 - the star import resolves every lazy name
    assert set(affeq_rt.__all__) <= set(ns)
    assert affeq_rt.io is importlib.import_module("affeq_rt.io")  # a subpackage on attribute use
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = affeq_rt.no_such_name
    assert getattr(affeq_rt, "no.such", None) is None  # not a submodule path to import


def test_option_defaults_written_out_in_the_cli_are_the_librarys() -> None:
    """Two defaults the CLI spells out instead of importing (NumPy-heavy modules)."""
    from affeq_rt.cli import ablate, depth
    from affeq_rt.method.depth import METHODS
    from affeq_rt.vis.corrupt import SALT_PEPPER_AMOUNTS

    assert ",".join(f"{a:g}" for a in SALT_PEPPER_AMOUNTS) == ablate.AMOUNTS
    assert depth.METHODS == METHODS
