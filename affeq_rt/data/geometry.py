"""timm's eval geometry of an image (the short side resized, then a centre crop) and its limits.

Shared by every pipeline (``data.preprocess`` on the CPU, ``data.gpu_decode`` on a GPU), so that
each crops the same box and refuses the same images with the same one-line errors.
"""

from __future__ import annotations

import math

from affeq_rt.errors import AffeqError

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


def check_geometry(size: tuple[int, int], source: str = "the image") -> None:
    """AffeqError if an image of ``size`` (w, h) is empty or more elongated than
    ``MAX_ASPECT``."""
    w, h = size
    if min(w, h) < 1:
        raise AffeqError(f"{source} is empty ({w}×{h} pixels)", "pass a non-empty image")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise AffeqError(f"{source} is {w}×{h} pixels, more than {MAX_ASPECT:g} times longer "
                         "than wide", "crop it to a less elongated region first")


def geometry(size: tuple[int, int], out: int, crop_pct: float,
             source: str = "the image") -> tuple[int, int, int, int]:
    """timm eval geometry of a (w, h) image: (nw, nh, left, top): the short side resized to
    floor(out / crop_pct), then an ``out``² crop at (left, top) of the resized image.

    AffeqError (naming ``source``) before any resize that would enlarge more than
    ``MAX_UPSCALE`` times or produce more than ``MAX_RESIZE_PIXELS`` pixels.
    """
    scale = math.floor(out / crop_pct)
    w, h = size
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
    return nw, nh, int(round((nw - out) / 2.0)), int(round((nh - out) / 2.0))
