"""Test fixture builder: a folder of real photos (scikit-image's samples) in real file formats.

Written as JPEG and PNG, including a grayscale JPEG, an RGBA PNG, a CMYK JPEG, a palette PNG,
and (optionally) a corrupt and a truncated file. Deterministic: same bytes on every call.

The unreadable files sort into the middle of the list (``broken.jpg`` third, ``clipped.jpg``
eighth of 23), never last: a kill, Ctrl-C, shard or resume at 4 samples or more has crossed a
skipped image, so the sample count differs from the row count there (issue 23: named ``zz_*``,
they sorted last and a resume that restarted at the row count passed every test).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

RGB = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
       "colorwheel", "retina"]
GRAY = ["camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell", "clock"]


def _load(name: str) -> np.ndarray:
    import skimage.data as d

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(getattr(d, name)())


def photo_images() -> list[tuple[str, Image.Image]]:
    """(file name, PIL image) pairs: RGB photos, grayscale photos, an RGBA logo, CMYK, palette."""
    out: list[tuple[str, Image.Image]] = []
    for n in RGB:
        im = Image.fromarray(_load(n))
        if max(im.size) > 640:
            im = im.resize((im.size[0] // 2, im.size[1] // 2), Image.Resampling.BILINEAR)
        out.append((f"{n}.jpg", im))
    for n in GRAY:
        out.append((f"{n}.jpg" if n != "coins" else f"{n}.png", Image.fromarray(_load(n))))
    out.append(("logo_rgba.png", Image.fromarray(_load("logo"), mode="RGBA")))
    out.append(("chelsea_cmyk.jpg", Image.fromarray(_load("chelsea")).convert("CMYK")))
    out.append(("coffee_palette.png", Image.fromarray(_load("coffee")).convert("P")))
    return out


#: The unreadable files ``write_photos`` adds (mid-list in sorted order, see the module doc).
CORRUPT, TRUNCATED = "broken.jpg", "clipped.jpg"


def write_photos(folder: Path, count: int | None = None, corrupt: bool = True) -> list[Path]:
    """Write ``count`` photos (all by default) into ``folder``, plus a corrupt and a truncated file
    (:data:`CORRUPT`, :data:`TRUNCATED`) that sort between the photos.

    Returns the readable files written, sorted.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, im in photo_images()[:count]:
        p = folder / name
        if name.endswith(".jpg"):
            im.save(p, quality=90)
        else:
            im.save(p)
        written.append(p)
    if corrupt:
        (folder / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
        full = (folder / written[0].name).read_bytes()
        (folder / TRUNCATED).write_bytes(full[: len(full) // 3])
    return sorted(written)


# Three registry networks of different families (torchvision MobileNet-v2, timm EfficientNet-Lite0,
# torchvision GoogLeNet), run with random weights at a small input size through the real
# preprocessing, so end-to-end tests take seconds on a CPU.
E2E_MODELS = ["mobilenet_v2", "efficientnet_lite0", "googlenet"]
E2E_INPUT = 96


def small_registry(folder: Path, models: list[str] = E2E_MODELS, size: int = E2E_INPUT) -> Path:
    """Copy the repository's specs of ``models`` into ``folder`` with ``input_size`` = ``size``."""
    import json

    repo_models = Path(__file__).resolve().parents[2] / "models"
    folder.mkdir(parents=True, exist_ok=True)
    for m in models:
        spec = json.loads((repo_models / f"{m}.json").read_text())
        spec["input_size"] = size
        (folder / f"{m}.json").write_text(json.dumps(spec, indent=1))
    return folder


def export_cache(request, tmp_path_factory) -> Path:
    """The folder random-weight exports are cached in: pytest's cache (kept between runs) when
    its plugin is on, else one folder per session (``pytest -p no:cacheprovider``)."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("affeq-e2e-exports"))
    folder = tmp_path_factory.getbasetemp() / "affeq-e2e-exports"
    folder.mkdir(exist_ok=True)
    return folder


def _e2e_env(request, tmp_path_factory):
    """Small-input registry, a persistent export cache (pytest cache) and a folder of photos."""
    import os

    base = tmp_path_factory.mktemp("e2e")
    reg = small_registry(base / "models")
    exports = export_cache(request, tmp_path_factory)
    old = os.environ.get("AFFEQ_RT_MODELS")
    os.environ["AFFEQ_RT_MODELS"] = str(reg)
    good = write_photos(base / "photos", corrupt=True)
    yield {"base": base, "models": reg, "exports": str(exports), "photos": base / "photos",
           "good": good}
    if old is None:
        os.environ.pop("AFFEQ_RT_MODELS", None)
    else:
        os.environ["AFFEQ_RT_MODELS"] = old


try:
    import pytest

    e2e_env = pytest.fixture(scope="module")(_e2e_env)
except ImportError:  # used outside pytest
    pass
