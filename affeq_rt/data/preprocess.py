"""Image decoding and per-backbone evaluation preprocessing (timm's eval transform, in PIL + NumPy).

``load_image`` decodes once (any mode → RGB); ``preprocess`` applies one backbone's resize,
centre crop and normalisation, so one decoded image feeds every network.

The work per image is bounded (issue 10: a 118-byte 1×20000 PNG took 5.3 GB, because the short
side is scaled up before the crop): a decoded image may be at most ``MAX_ASPECT`` times longer
than wide, the resize may enlarge at most ``MAX_UPSCALE`` times and produce at most
``MAX_RESIZE_PIXELS`` pixels; PIL's own decompression-bomb limit guards the decode. Each is one
AffeqError naming the file (``load_image`` records it in ``img.info[SOURCE_KEY]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.registry.spec import BackboneSpec, Preprocessing

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image

#: Longest side / shortest side of a decoded image. Wide panoramas are ~1:10; the resize output
#: is scale²·aspect pixels, so with scale ≤ 640 (a 560-px input at crop_pct 0.875) this bounds it
#: to 640²·32 ≈ 13 M pixels (≈ 40 MB as RGB).
MAX_ASPECT = 32.0
#: Largest enlargement of the short side: 32-px CIFAR images to a 331-px net (÷0.911) is ×11;
#: a 4-px image to 256 is ×64; a 1-px line is refused (nothing left to see, and huge outputs).
MAX_UPSCALE = 64.0
#: Largest resize output, in pixels (the decompression-bomb check on the output): 2²⁵ ≈ 33.5 M
#: pixels ≈ 100 MB as RGB, far above any net's eval geometry (a 4:3 photo to 640 px ≈ 0.55 M).
MAX_RESIZE_PIXELS = 1 << 25
#: ``Image.info`` key under which ``load_image`` records the file (PIL copies ``info`` through
#: ``convert``), so later geometry errors can name it.
SOURCE_KEY = "affeq_rt.source"

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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB, or raise AffeqError naming the file."""
    try:
        with Image.open(path) as im:
            check_geometry(im.size, str(path))
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
    return rgb


def check_geometry(size: tuple[int, int], source: str = "the image") -> None:
    """AffeqError if an image of ``size`` (w, h) is empty or more elongated than
    ``MAX_ASPECT``."""
    w, h = size
    if min(w, h) < 1:
        raise AffeqError(f"{source} is empty ({w}×{h} pixels)", "pass a non-empty image")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise AffeqError(f"{source} is {w}×{h} pixels, more than {MAX_ASPECT:g} times longer "
                         "than wide", "crop it to a less elongated region first")


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
    """timm eval geometry: short side to floor(size / crop_pct), then a centre crop of size².

    AffeqError (naming the file when ``load_image`` decoded it) before any resize that would
    enlarge more than ``MAX_UPSCALE`` times or produce more than ``MAX_RESIZE_PIXELS`` pixels.
    """
    scale = math.floor(size / crop_pct)
    w, h = img.size
    source = str(img.info.get(SOURCE_KEY, "the image"))
    check_geometry((w, h), source)
    if scale / min(w, h) > MAX_UPSCALE:
        raise AffeqError(f"{source} is {w}×{h} pixels: its short side would be enlarged "
                         f"{scale / min(w, h):.0f} times (to {scale}), more than {MAX_UPSCALE:g}",
                         "pass a larger image")
    if w <= h:
        nw, nh = scale, int(scale * h / w)
    else:
        nw, nh = int(scale * w / h), scale
    if nw * nh > MAX_RESIZE_PIXELS:
        raise AffeqError(f"{source} ({w}×{h} pixels) would resize to {nw}×{nh} = "
                         f"{nw * nh / 1e6:.0f} M pixels, over the {MAX_RESIZE_PIXELS / 1e6:.0f} M "
                         "limit", "crop the image to a less elongated region first")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _INTERP[interpolation])
    left = int(round((nw - size) / 2.0))
    top = int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


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
