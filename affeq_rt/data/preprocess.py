"""Image decoding and per-backbone evaluation preprocessing (timm's eval transform, in PIL + NumPy).

``load_image`` decodes once (any mode → RGB); ``preprocess`` applies one backbone's resize,
centre crop and normalisation, so one decoded image feeds every network.
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
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise AffeqError(f"image {path} does not exist", "check the path") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise AffeqError(f"{path} is not a readable image ({e.__class__.__name__}: {e})",
                         "pass a JPEG/PNG/… image file") from None


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
    """timm eval geometry: short side to floor(size / crop_pct), then a centre crop of size²."""
    scale = math.floor(size / crop_pct)
    w, h = img.size
    if w <= h:
        nw, nh = scale, int(scale * h / w)
    else:
        nw, nh = int(scale * w / h), scale
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
