"""Image decoding and per-backbone evaluation preprocessing (timm's eval transform, in PIL + NumPy).

``load_image`` decodes once (any mode → RGB); ``preprocess`` applies one backbone's resize,
centre crop and normalisation, so one decoded image feeds every network.

Pipelines (how a file becomes uint8 crops; the loader's ``pipeline``, issue 25):

- ``exact``: timm's eval transform as published: Pillow resizes the whole image, then crops.
- ``pillow``: Pillow resizes only the crop's region (``resize(box=…)``: the same filter taps,
  ≤ 2 levels apart from ``exact``) and lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 size
  (``draft``) when it is at least 4× larger than the resize target. Never imports torch.
- ``torchvision``: JPEG decoded by torchvision's libjpeg-turbo (bit-identical to Pillow's
  decode) and resized by torch's uint8 antialiased resize: Pillow's two passes and rounding
  with int16 weights (≈ 15 fractional bits against Pillow's 22), so ≤ 2 levels apart from
  ``exact``, on 0.1–0.3 % of pixels (``pillow``: 0.01–0.1 %); other files, Lanczos/nearest
  geometries and images large enough for DCT downscaling take the ``pillow`` route.
- ``nvjpeg``: JPEGs decoded on a CUDA GPU by nvJPEG (torchvision) and resized there with
  Pillow's own taps and rounding (``data.gpu_decode``: bit-identical to ``exact`` given the same
  decoded pixels, so only the decoder differs); other files take the ``exact`` route one by one.
  In the consuming process only.
- ``fast``: ``nvjpeg`` where extraction runs on a CUDA device and it loads, else ``torchvision``
  where it imports, else ``pillow``.

Normalisation is done per batch (``normalize_batch``, the same float32 operations as
``normalize``), so crops travel between processes as uint8.

The work per image is bounded (issue 10: a 118-byte 1×20000 PNG took 5.3 GB, because the short
side is scaled up before the crop): a decoded image may be at most ``MAX_ASPECT`` times longer
than wide, the resize may enlarge at most ``MAX_UPSCALE`` times and produce at most
``MAX_RESIZE_PIXELS`` pixels; PIL's own decompression-bomb limit guards the decode. Each is one
AffeqError naming the file (``load_image`` records it in ``img.info[SOURCE_KEY]``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from affeq_rt.data import gpu_decode
from affeq_rt.data.geometry import (  # noqa: F401 — re-exported: the pipeline's geometry
    MAX_ASPECT,
    MAX_RESIZE_PIXELS,
    MAX_UPSCALE,
    check_geometry,
    geometry,
)
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.registry.spec import BackboneSpec, Preprocessing

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image

#: ``Image.info`` key under which ``load_image`` records the file (PIL copies ``info`` through
#: ``convert``), so later geometry errors can name it.
SOURCE_KEY = "affeq_rt.source"
#: ``Image.info`` key, set when libjpeg downscaled the decode (``draft``): (scale, W, H), the
#: power of two and the file's own size, on which the crop geometry is always computed.
DRAFT_KEY = "affeq_rt.draft_scale"
#: DCT downscaling only while the decoded short side stays ≥ this many times the resize target,
#: so Pillow's antialiased resize still does the last ≥ 2× of the reduction.
DRAFT_MARGIN = 2

PIPELINES = ("exact", "fast", "pillow", "torchvision", "nvjpeg")
#: The loader's default pipeline (issue 25: chosen by the top-1 agreement measured with
#: bench/preprocess_accuracy.py, docs/BENCHMARKS.md).
DEFAULT_PIPELINE = "exact"

_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, CMYK, RGBA, LA, I;16 …) to RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / hi * 255.0).round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, draft_short_side: int | None = None) -> Image.Image:
    """Decode an image file to RGB, or raise AffeqError naming the file.

    ``draft_short_side``: a JPEG whose short side is at least ``DRAFT_MARGIN`` × 2 times this is
    decoded by libjpeg at 1/2, 1/4 or 1/8 size, keeping the short side ≥ ``DRAFT_MARGIN`` times
    it; (scale, W, H) are recorded in ``img.info[DRAFT_KEY]`` (the ``pillow`` pipeline).
    """
    drafted: tuple[int, int, int] | None = None
    try:
        with Image.open(path) as im:
            check_geometry(im.size, str(path))
            if draft_short_side and im.format == "JPEG":
                drafted = _draft(im, draft_short_side)
            im.load()
            rgb = to_rgb(im)
    except FileNotFoundError:
        raise AffeqError(f"image {path} does not exist", "check the path") from None
    except Image.DecompressionBombError as e:
        raise AffeqError(f"{path} is too large to decode safely ({e})",
                         "downscale the image first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise AffeqError(f"{path} is not a readable image ({e.__class__.__name__}: {e})",
                         "pass a JPEG/PNG/… image file") from None
    rgb.info[SOURCE_KEY] = str(path)
    if drafted:
        rgb.info[DRAFT_KEY] = drafted
    return rgb


def _draft(im: Image.Image, short_side: int) -> tuple[int, int, int] | None:
    """Ask libjpeg for a DCT-downscaled decode of ``im`` (not yet loaded) that keeps its short
    side ≥ ``DRAFT_MARGIN`` · ``short_side``: (scale, W, H), or None when it would not reduce."""
    w, h = im.size
    k = DRAFT_MARGIN * short_side / min(w, h)
    if k > 0.5:
        return None
    res = im.draft(im.mode, (math.ceil(w * k), math.ceil(h * k)))
    if res is None or im.size == (w, h):
        return None
    _, box = res  # the file's extent in the reduced image: (0, 0, W / scale, H / scale)
    return round(w / box[2]), w, h


def sample_photo(name: str) -> Image.Image:
    """One of scikit-image's sample photos as RGB (stereo pairs: the left image; masks: 0/255).

    Raises ImportError without scikit-image; a sample it would have to download raises its error.
    """
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):
        arr = arr[0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return to_rgb(Image.fromarray(arr))


def resize_crop(img: Image.Image, size: int, crop_pct: float, interpolation: str) -> Image.Image:
    """timm eval geometry (:func:`geometry`): resize the whole image, then a centre crop of size².

    AffeqError (naming the file when ``load_image`` decoded it) before any resize that would
    enlarge more than ``MAX_UPSCALE`` times or produce more than ``MAX_RESIZE_PIXELS`` pixels.
    """
    nw, nh, left, top = geometry(img.size, size, crop_pct,
                                 str(img.info.get(SOURCE_KEY, "the image")))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), _INTERP[interpolation])
    return img.crop((left, top, left + size, top + size))


#: Pillow's filter supports (half-widths in source pixels at scale ≤ 1), for the rows a region
#: resize reads.
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "lanczos": 3.0}


def region_crop(img: Image.Image, spec: BackboneSpec | Preprocessing) -> np.ndarray:
    """The ``pillow`` pipeline's crop, uint8 [S, S, 3]: only the crop's region is resized, with
    the geometry of the file's own size even when libjpeg decoded it downscaled
    (``img.info[DRAFT_KEY]``).

    Two explicit passes, horizontal then vertical, the order in which Pillow resizes a whole
    image (Pillow ≥ 13 runs the vertical pass first when it shrinks the height much more than
    the width, and given a box it chose that here, moving high-contrast edges by up to 20
    levels): the rows the vertical filter reads are cut out, resized horizontally to the crop's
    columns, then vertically to its rows. The filter taps are those of the whole-image resize up
    to float rounding of their centres, so undownscaled the result is within 2 levels of
    :func:`crop` (one level in the first pass, times the vertical taps' absolute sum ≤ 1.14,
    plus the last rounding) wherever Pillow resizes the whole image horizontally first: every
    version before 13, and with 13 the eval geometry of all but very tall images.
    """
    p = preprocess_key(spec)
    s, *full = img.info.get(DRAFT_KEY) or (1, *img.size)  # libjpeg's size is ceil(W / s)
    out = p.input_size
    nw, nh, left, top = geometry((full[0], full[1]), out, p.crop_pct,
                                 str(img.info.get(SOURCE_KEY, "the image")))
    sx, sy = full[0] / nw / s, full[1] / nh / s  # source pixels per output pixel
    x0, x1, y0, y1 = left * sx, (left + out) * sx, top * sy, (top + out) * sy
    resample = _INTERP[p.interpolation]
    if p.interpolation not in _SUPPORT:  # nearest: no filter to save work on
        return crop(img, p) if s == 1 else np.asarray(
            img.resize((out, out), resample, box=(x0, y0, x1, y1)), np.uint8)
    reach = _SUPPORT[p.interpolation] * max(sy, 1.0) + 2  # + Pillow's rounding of tap bounds
    lo, hi = max(0, math.floor(y0 - reach)), min(img.size[1], math.ceil(y1 + reach))
    rows = img.crop((0, lo, img.size[0], hi))
    rows = rows.resize((out, hi - lo), resample, box=(x0, 0, x1, hi - lo))  # horizontal only
    res = rows.resize((out, out), resample, box=(0, y0 - lo, out, y1 - lo))  # vertical only
    return np.asarray(res, dtype=np.uint8)


def normalize(arr_hwc_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HWC → float32 CHW, scaled to [0, 1] and normalised by mean/std."""
    x = arr_hwc_uint8.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_key(spec: BackboneSpec | Preprocessing) -> Preprocessing:
    """The preprocessing of a spec: specs with equal keys share one prepared tensor."""
    if isinstance(spec, BackboneSpec):
        return spec.preprocessing
    if isinstance(spec, Preprocessing):
        return spec
    raise InternalError(f"preprocessing needs a BackboneSpec or Preprocessing, got "
                        f"{type(spec).__name__}")


def crop(img: Image.Image, spec: BackboneSpec | Preprocessing) -> np.ndarray:
    """The resized, centre-cropped image as uint8 [S, S, 3] RGB (before normalisation)."""
    p = preprocess_key(spec)
    return np.asarray(resize_crop(to_rgb(img), p.input_size, p.crop_pct, p.interpolation),
                      dtype=np.uint8)


def preprocess(img: Image.Image, spec: BackboneSpec | Preprocessing) -> np.ndarray:
    """One backbone's evaluation preprocessing: float32 array (3, S, S)."""
    p = preprocess_key(spec)
    return normalize(crop(img, p), p.mean, p.std)


def normalize_batch(crops: np.ndarray, spec: BackboneSpec | Preprocessing,
                    out: np.ndarray | None = None) -> np.ndarray:
    """uint8 crops [N, S, S, 3] → float32 [N, 3, S, S], normalised by the spec's mean/std.

    The same float32 operations as :func:`normalize` in the same order (so each element is
    bit-identical to it), done once for the whole batch, channel planes first.
    """
    p = preprocess_key(spec)
    n, hh, ww, c = crops.shape
    if c != 3 or crops.dtype != np.uint8:
        raise InternalError(f"normalize_batch needs uint8 [N, S, S, 3], got {crops.dtype} "
                            f"{crops.shape}")
    x = out if out is not None else np.empty((n, 3, hh, ww), np.float32)
    x[...] = crops.transpose(0, 3, 1, 2)
    x *= np.float32(1.0 / 255.0)
    x -= np.asarray(p.mean, dtype=np.float32)[None, :, None, None]
    x /= np.asarray(p.std, dtype=np.float32)[None, :, None, None]
    return x


def torchvision_installed() -> bool:
    """Whether torchvision can be found (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


@lru_cache(maxsize=1)
def _torchvision() -> Any:
    """torchvision's image decoding and resize, or None where it does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
            from torchvision.transforms.v2 import functional as tvf
    except Exception:  # noqa: BLE001 — missing, or a broken install: the Pillow route remains
        return None
    return torch, decode_jpeg, ImageReadMode.RGB, tvf


def resolve_pipeline(pipeline: str, device: str | None = None) -> str:
    """The concrete pipeline ``pipeline`` names for extraction on ``device`` (None: the CPU):
    ``fast`` → ``nvjpeg`` on a CUDA device where it loads, else ``torchvision`` where it imports,
    else ``pillow`` (on the CPU nothing is imported to decide); ``nvjpeg`` asked where it does
    not load and unknown names are one-line AffeqErrors."""
    if pipeline not in PIPELINES:
        raise AffeqError(f"unknown preprocessing pipeline {pipeline!r}",
                         f"pass one of {', '.join(PIPELINES)}")
    if pipeline == "fast":
        if gpu_decode.is_cuda(device) and gpu_decode.nvjpeg_status(str(device))[0]:
            return "nvjpeg"
        return "torchvision" if torchvision_installed() else "pillow"
    if pipeline == "torchvision" and not torchvision_installed():
        raise AffeqError("the torchvision preprocessing pipeline needs torchvision",
                         "pip install torchvision, or use the pillow pipeline")
    if pipeline == "nvjpeg":
        gpu_decode.require_nvjpeg(gpu_decode.decode_device(device))
    return pipeline


def _torch_crops(path: str, im: Image.Image, keys: Sequence[Preprocessing]) -> list[np.ndarray]:
    """The ``torchvision`` route for one opened (not decoded) baseline JPEG: libjpeg-turbo decode,
    torch's antialiased resize of the whole image, crop; RuntimeError if torchvision refuses it."""
    tv = _torchvision()
    if tv is None:  # found but broken: every file takes the Pillow route
        raise RuntimeError("torchvision does not import")
    torch, decode_jpeg, rgb, tvf = tv
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice, once per call
        t = decode_jpeg(data, mode=rgb)
    if tuple(t.shape[1:]) != (im.size[1], im.size[0]):
        raise RuntimeError(f"decoded {tuple(t.shape)} for a {im.size} image")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image is too little to share: other threads only spin
    try:
        return [_torch_crop(t, im.size, k, path, tvf) for k in keys]
    finally:
        torch.set_num_threads(threads)


def _torch_crop(t: Any, size: tuple[int, int], k: Preprocessing, path: str,
                tvf: Any) -> np.ndarray:
    """One key's uint8 [S, S, 3] crop of a decoded uint8 [3, H, W] tensor."""
    nw, nh, left, top = geometry(size, k.input_size, k.crop_pct, path)
    mode = tvf.InterpolationMode.BICUBIC if k.interpolation == "bicubic" \
        else tvf.InterpolationMode.BILINEAR
    r = t if (nw, nh) == size else tvf.resize(t, [nh, nw], interpolation=mode, antialias=True)
    c = r[:, top:top + k.input_size, left:left + k.input_size]
    return np.ascontiguousarray(c.permute(1, 2, 0).numpy())


def _torch_route(im: Image.Image, keys: Sequence[Preprocessing]) -> bool:
    """Whether an opened file takes the ``torchvision`` route: a plain RGB/grey JPEG, bilinear
    or bicubic geometries, and not large enough for DCT downscaling."""
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return False
    if any(k.interpolation not in ("bilinear", "bicubic") for k in keys):
        return False
    need = max(math.floor(k.input_size / k.crop_pct) for k in keys)
    return DRAFT_MARGIN * need / min(im.size) > 0.5


def prepare_crops(path: str, keys: Sequence[Preprocessing], pipeline: str) -> list[np.ndarray]:
    """Decode ``path`` once and return its uint8 [S, S, 3] crop for each key, by ``pipeline``
    (a concrete one: see :func:`resolve_pipeline`; ``nvjpeg`` here is its per-file CPU route,
    ``exact``'s); AffeqError names an unreadable file."""
    if pipeline in ("exact", "nvjpeg"):  # nvjpeg: a file the GPU route did not take
        img = load_image(path)
        return [crop(img, k) for k in keys]
    if pipeline == "torchvision":
        try:
            with Image.open(path) as im:
                check_geometry(im.size, str(path))
                if _torch_route(im, keys):
                    return _torch_crops(str(path), im, keys)
        except (RuntimeError, OSError, SyntaxError, ValueError, UnidentifiedImageError):
            pass  # odd files (and unreadable ones, for their own message) take the Pillow route
    elif pipeline != "pillow":
        raise InternalError(f"prepare_crops needs a concrete pipeline, got {pipeline!r}")
    img = load_image(path, draft_short_side=max(math.floor(k.input_size / k.crop_pct)
                                                for k in keys))
    return [region_crop(img, k) for k in keys]
