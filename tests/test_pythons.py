"""Every declared Python (slow): on each Python the classifiers list besides CI's own (3.11),
the wheel is built as a user builds it, installed with the serve extra into a fresh venv, and
smoke-tested from outside the checkout: ``info``, ``predict`` on a hybrid, and ``serve``
(KServe's model server, 3.10-3.13) answering one tritonclient request with onnxruntime's logits.

What a user's ``pip install "affeq_rt-*.whl[serve]"`` resolves to is read in full from pip's
``--dry-run --report`` (metadata only; every requirement, torch included, must resolve on that
Python); everything it resolves is installed at those versions except the torch stack (torch,
torchvision, timm, triton and the nvidia/cuda wheels: 5-7 GB per Python, three Pythons filled
CI's disk). No command tried here imports torch: ``predict`` and ``serve`` of an exported model
are torch-free by design (issue 25), and the test asserts it. The venvs are removed afterwards.

Interpreters: ``AFFEQ_RT_PYTHONS`` (``3.10,3.12,3.13`` by default), pyenv's own binary first,
then ``pythonX.Y`` on PATH; a missing one is skipped with the reason. Needs PyPI (the build
requirements and the dependencies, torch included: a few GB the first time, pip's cache after).
Measured: 3.13 and 3.10 in 23 min together, 3.12 in 8.5 min, on the loaded 2-core machine.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERSIONS = [v.strip() for v in os.environ.get("AFFEQ_RT_PYTHONS", "3.10,3.12,3.13").split(",")
            if v.strip()]

HEAVY = re.compile(r"^(torch|torchvision|timm|triton|nvidia-.*|cuda-.*)$")  # the torch stack
TOP1 = re.compile(r"^\s+1\.\s+(\d+\s+\S+)", re.MULTILINE)  # "  1.   281   97.1%  tabby"
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch's exporter


def find_python(version: str) -> str | None:
    """An interpreter for ``version`` (``3.10``) that runs: pyenv's own binary, else
    ``pythonX.Y`` on PATH (a pyenv shim there fails unless that version is selected)."""
    pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")
    for cand in [*sorted(glob.glob(pattern), reverse=True), shutil.which(f"python{version}")]:
        if cand and subprocess.run([cand, "-c", "pass"], capture_output=True).returncode == 0:
            return cand
    return None


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1200
        ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res


SERVE_ONE = r"""
import json, subprocess, sys, time
import numpy as np, onnxruntime as ort, tritonclient.http as th
model, port, grpc_port = sys.argv[1], sys.argv[2], sys.argv[3]
proc = subprocess.Popen(["affeq-rt", "serve", model, "--port", port, "--grpc-port", grpc_port],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
client = th.InferenceServerClient(f"127.0.0.1:{port}")
try:
    for _ in range(600):
        try:
            if client.is_model_ready("tiny_a_to_tiny_b"):
                break
        except Exception:
            pass
        if proc.poll() is not None:
            sys.exit("serve exited: " + proc.stdout.read()[-2000:])
        time.sleep(0.2)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    inp = th.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # tritonclient's default: binary tensors
    got = client.infer("tiny_a_to_tiny_b", [inp]).as_numpy("logits")
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": x})[0]
    print(json.dumps({"equal": bool(np.array_equal(got, want)), "shape": list(got.shape)}))
finally:
    client.close()
    proc.terminate()
    proc.wait(timeout=60)
"""


@pytest.fixture(scope="module")
def tiny_hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from test_hybrid import TinyParts

    base = tmp_path_factory.mktemp("pythons")
    return TinyParts(base / "parts").build(base / "h.onnx")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, with its venvs removed afterwards, passed or failed (hundreds of MB each;
    the failure message carries the evidence)."""
    yield tmp_path
    for name in ("tools", "venv"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_wheel_on_python(version: str, tiny_hybrid: Path, photo_files: dict[str, Path],
                         scratch: Path) -> None:
    tmp_path = scratch
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv install {version}, or set AFFEQ_RT_PYTHONS)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("AFFEQ_RT_MODELS", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["AFFEQ_RT_HOME"] = str(tmp_path / "home")
    work = tmp_path / "outside"  # every command runs here, outside the checkout
    work.mkdir()

    # 1. The wheel, built by this Python as a user would: `python -m build` with isolation.
    tools = tmp_path / "tools"
    run([python, "-m", "venv", str(tools)], work, env)
    run([str(tools / "bin" / "python"), "-m", "pip", "install", "-q", "build"], work, env)
    dist = tmp_path / "dist"
    run([str(tools / "bin" / "python"), "-m", "build", "--wheel", "--outdir", str(dist),
         str(REPO)], work, env)
    (wheel,) = dist.glob("affeq_rt-*.whl")
    tag = f"cp{version.replace('.', '')}"
    assert f"-{tag}-" in wheel.name, wheel.name

    # 2. A fresh venv. What the README's `pip install "<wheel>[serve]"` resolves to, in full
    #    (metadata only), then all of it at those versions but the torch stack (module doc).
    venv = tmp_path / "venv"
    run([python, "-m", "venv", str(venv)], work, env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    vpy = str(venv / "bin" / "python")
    report = tmp_path / "resolved.json"
    run([vpy, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report",
         str(report), f"{wheel}[serve]"], work, env)
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert {"torch", "timm", "onnxruntime-gpu", "tritonclient", "kserve"} <= set(resolved), \
        resolved
    assert "mlserver" not in resolved, resolved
    from affeq_rt.deploy.serve import free_port

    pins = [f"{name}=={ver}" for name, ver in resolved.items()
            if name != "affeq-rt" and not HEAVY.match(name)]
    run([vpy, "-m", "pip", "install", "-q", "--no-deps", str(wheel), *pins], work, env)
    meta = run([vpy, "-c", "import importlib.metadata as m, json, sys; print(json.dumps("
                "{'py': list(sys.version_info[:2]), 'requires': m.metadata('affeq-rt')"
                "['Requires-Python'], 'classifiers': m.metadata('affeq-rt').get_all("
                "'Classifier')}))"], work, env)
    info = json.loads(meta.stdout)
    assert info["py"] == [int(p) for p in version.split(".")]
    assert f"Programming Language :: Python :: {version}" in info["classifiers"], info

    # 3. The first commands: info, predict on a hybrid.
    out = run(["affeq-rt", "info"], work, env).stdout
    assert "cpu" in out, out
    cmd = ["predict", str(tiny_hybrid), str(photo_files["chelsea"]), "--top", "1"]
    got = TOP1.search(run(["affeq-rt", *cmd], work, env).stdout)
    want = TOP1.search(run([sys.executable, "-m", "affeq_rt.cli.main", *cmd], work,
                           dict(os.environ)).stdout)  # this checkout, on this Python
    assert got is not None, got
    assert want is not None, want
    assert got.group(1) == want.group(1)  # the same class (and printed probability)

    # 4. serve + one tritonclient request: logits equal to onnxruntime's on the same file
    #    (the same file through the same onnxruntime arithmetic: bit-identical).
    res = run([vpy, "-c", SERVE_ONE, str(tiny_hybrid), str(free_port()), str(free_port())],
              work, env, timeout=600)
    answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert answer == {"equal": True, "shape": [2, 7]}, answer
