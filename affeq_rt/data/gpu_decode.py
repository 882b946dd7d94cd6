"""The ``nvjpeg`` pipeline (issue 25 item 3): JPEGs decoded on a CUDA GPU, resized as Pillow does.

Decode: torchvision's ``decode_jpeg(..., device="cuda")`` (nvJPEG), one batched call per loader
batch. Resize and crop: :func:`crop_tensor`, Pillow's two-pass resize of the whole image
(in Pillow's order of passes) written as two matrix products of the uint8 image with Pillow's own
22-bit integer taps, in float64, with Pillow's rounding and clipping after each pass. Every product
and partial sum is an integer below 2⁵³, so the result is Pillow's to the bit on any device and
in any summation order: given the same decoded pixels, a crop equals the ``exact`` pipeline's
(timm's eval transform). Only the decoder differs from ``exact`` (nvJPEG's IDCT and chroma
upsampling are not libjpeg-turbo's), which is what the GPU check measures.

The crops come back to the host as uint8 and the loader normalises them as for every pipeline
(``normalize_batch``), so tensors, stores and ONNX sessions are unchanged. Files the GPU route does
not take (not a plain RGB/grey baseline or progressive JPEG, no end-of-image marker, a geometry
error, a Lanczos/nearest geometry) or that nvJPEG refuses take the ``exact`` route one by one, so
an unreadable file is skipped with exactly the CPU pipelines' message. Runs in the consuming
process (no decode workers).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from affeq_rt.data.geometry import check_geometry, geometry
from affeq_rt.errors import AffeqError
from affeq_rt.registry.spec import Preprocessing

#: Pillow's fixed-point precision for 8-bit resampling (``Resample.c``: 32 - 8 - 2).
PRECISION_BITS = 22
#: Interpolations whose Pillow filter is a polynomial, so its taps are reproduced exactly here.
GPU_INTERPOLATIONS = ("bilinear", "bicubic")
#: A JPEG's end-of-image marker: a file without it at its end is truncated for Pillow (an error
#: there) while nvJPEG may decode it to a half-grey picture, so such files take the CPU route.
EOI = b"\xff\xd9"

_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(x: np.ndarray, interpolation: str) -> np.ndarray:
    """Pillow's filter (``bilinear_filter`` / ``bicubic_filter``, a = -0.5) at ``x``, the same
    float64 operations in the same order."""
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=512)
def pillow_taps(in_size: int, out_size: int, lo: int, count: int,
                interpolation: str) -> np.ndarray:
    """Pillow's integer taps for resizing ``in_size`` pixels to ``out_size``, output pixels
    ``lo .. lo+count-1`` only: float64 [count, in_size], each entry an integer (weight · 2²²).

    ``precompute_coeffs`` then ``normalize_coeffs_8bpc`` of Pillow's ``Resample.c``, vectorised
    over output pixels, each float64 operation as there (the weight sum is accumulated tap by tap,
    not pairwise, and the rounding truncates ``w·2²² ± 0.5`` toward zero)."""
    support_base = _SUPPORT[interpolation]
    scale = float(in_size) / out_size  # (double)(in1 - in0) / outSize, box (0, W)
    filterscale = max(scale, 1.0)
    support = support_base * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = np.arange(lo, lo + count, dtype=np.float64)
    center = 0.0 + (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    k = np.zeros((count, ksize))
    ww = np.zeros(count)
    for x in range(ksize):
        w = _filter((x + xmin - center + 0.5) * ss, interpolation)
        w = np.where(x < xmax, w, 0.0)
        k[:, x] = w
        ww = ww + w  # tap by tap, as the C loop (adding 0.0 past xmax changes nothing)
    k = np.where(ww[:, None] != 0.0, k / np.where(ww == 0.0, 1.0, ww)[:, None], k)
    fixed = np.trunc(np.where(k < 0, -0.5 + k * (1 << PRECISION_BITS),
                              0.5 + k * (1 << PRECISION_BITS)))
    m = np.zeros((count, in_size))
    rows = np.arange(count)[:, None]
    cols = xmin[:, None] + np.arange(ksize)[None, :]
    valid = np.arange(ksize)[None, :] < xmax[:, None]
    m[np.broadcast_to(rows, cols.shape)[valid], cols[valid]] = fixed[valid]
    return m


class _Taps:
    """``pillow_taps`` on one device, cut to the source pixels they read: (taps [count, hi-lo],
    lo, hi). A data set has a few hundred image sizes."""

    def __init__(self) -> None:
        self.cache: dict[tuple, tuple[Any, int, int]] = {}

    def get(self, torch: Any, device: Any, *key: Any) -> tuple[Any, int, int]:
        """The taps of ``key`` (``pillow_taps``' arguments) on ``device``, and their source span."""
        k = (str(device), *key)
        got = self.cache.get(k)
        if got is None:
            if len(self.cache) > 1024:
                self.cache.clear()
            m = pillow_taps(*key)
            used = np.flatnonzero(np.abs(m).sum(axis=0))
            lo, hi = int(used[0]), int(used[-1]) + 1
            got = self.cache[k] = (torch.from_numpy(np.ascontiguousarray(m[:, lo:hi])).to(device),
                                   lo, hi)
        return got


_TAPS = _Taps()


def _round_pass(acc: Any) -> Any:
    """Pillow's ``clip8`` of an accumulated pass: (2²¹ + Σ) >> 22, clipped to 0..255."""
    acc.add_(float(1 << (PRECISION_BITS - 1))).mul_(1.0 / (1 << PRECISION_BITS))
    return acc.floor_().clamp_(0.0, 255.0)  # in place: ``acc`` is the matmul's own result


@lru_cache(maxsize=1)
def _pillow_may_go_vertical_first() -> bool:
    """Whether this Pillow resizes vertically first when the height shrinks much more than the
    width (Pillow ≥ 13, python-pillow/Pillow#9549; earlier ones always go horizontal first):
    one 20×60 → 18×20 resize, compared with both orders done one pass at a time."""
    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (60, 20, 3), dtype=np.uint8))
    f = Image.Resampling.BILINEAR
    both = np.asarray(im.resize((18, 20), f))
    v_first = np.asarray(im.resize((20, 20), f).resize((18, 20), f))
    h_first = np.asarray(im.resize((18, 60), f).resize((18, 20), f))
    return bool((both == v_first).all() and not (both == h_first).all())


def vertical_first(w: int, h: int, nw: int, nh: int) -> bool:
    """Whether Pillow resizes a w×h image to nw×nh vertical pass first: with Pillow ≥ 13 when
    the height shrinks by more than twice as many pixels as the width (checked against Pillow on
    306 random geometries and the eval geometry of every aspect from 1:1 to 1:4.3), else never.
    The order matters: each pass rounds to uint8."""
    return nh < h and (h - nh) > 2 * (w - nw) and _pillow_may_go_vertical_first()


def crop_tensor(t: Any, key: Preprocessing, source: str = "the image") -> Any:
    """One key's uint8 [S, S, 3] crop of a decoded uint8 [3, H, W] tensor, on the tensor's own
    device: :func:`~affeq_rt.data.geometry.geometry`'s box, Pillow's resize of the whole image
    (bit-identical to it, in its order of passes), the centre crop. AffeqError (naming
    ``source``) as ``geometry``; ValueError for an interpolation not in ``GPU_INTERPOLATIONS``."""
    import torch

    if key.interpolation not in GPU_INTERPOLATIONS:
        raise ValueError(f"the GPU resize has no {key.interpolation} filter")
    h, w = int(t.shape[1]), int(t.shape[2])
    s = key.input_size
    nw, nh, left, top = geometry((w, h), s, key.crop_pct, source)
    wy = wx = None
    if nh != h:  # only the source rows the crop's rows read
        wy, y0, y1 = _TAPS.get(torch, t.device, h, nh, top, s, key.interpolation)
    else:
        y0, y1 = top, top + s
    if nw != w:  # and only the source columns its columns read
        wx, x0, x1 = _TAPS.get(torch, t.device, w, nw, left, s, key.interpolation)
    else:
        x0, x1 = left, left + s
    x = t[:, y0:y1, x0:x1]
    if wx is None and wy is None:
        return x.permute(1, 2, 0).contiguous()
    x = x.to(torch.float64)
    if wx is not None and wy is not None and vertical_first(w, h, nw, nh):
        x = _round_pass(torch.matmul(wy, x))  # [3, S, cols]
        x = _round_pass(torch.matmul(x, wx.T))
    else:
        if wx is not None:
            x = _round_pass(torch.matmul(x, wx.T))  # [3, rows, S]
        if wy is not None:
            x = _round_pass(torch.matmul(wy, x))
    return x.to(torch.uint8).permute(1, 2, 0).contiguous()


# ---- availability --------------------------------------------------------------------------------
def is_cuda(device: str | None) -> bool:
    """Whether ``device`` names a CUDA device (``cuda``, ``cuda:1``)."""
    return bool(device) and str(device).split(":")[0] == "cuda"


def decode_device(device: str | None) -> str:
    """The CUDA device nvjpeg decodes on for extraction on ``device``: that device when it names
    one (``cuda:1``), else the default ``cuda``."""
    return str(device) if is_cuda(device) else "cuda"


def device_of_providers(providers: Sequence[str]) -> str:
    """The device extraction runs on, from its onnxruntime sessions' providers (``provider``
    of each ``OrtModel``): ``cuda`` where any runs on CUDA or TensorRT, else ``cpu``."""
    gpu = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    return "cuda" if any(p in gpu for p in providers) else "cpu"


def _tiny_jpeg() -> bytes:
    """A 16×16 baseline JPEG (the probe's input)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@lru_cache(maxsize=4)
def nvjpeg_status(device: str = "cuda") -> tuple[bool, str]:
    """(available, why not): torch with a CUDA GPU, torchvision, and a JPEG decoded on
    ``device`` by ``decode_jpeg`` (some torchvision builds lack nvJPEG). Imports torch."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
    except Exception as e:  # noqa: BLE001 — any import failure is a reason, not a crash
        return False, f"torch does not import ({e.__class__.__name__}: {e})"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:  # noqa: BLE001
        return False, f"torchvision does not import ({e.__class__.__name__}: {e})"
    try:
        data = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        if tuple(out[0].shape) != (3, 16, 16):
            return False, f"torchvision's decode_jpeg on {device} returned {tuple(out[0].shape)}"
    except Exception as e:  # noqa: BLE001
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, (f"torchvision's decode_jpeg fails on {device} "
                       f"({e.__class__.__name__}: {line})")
    return True, ""


def require_nvjpeg(device: str = "cuda") -> None:
    """AffeqError (one line naming the fix) unless the ``nvjpeg`` pipeline loads here."""
    ok, why = nvjpeg_status(device)
    if not ok:
        raise AffeqError(f"the nvjpeg preprocessing pipeline does not load here: {why}",
                         "use --preprocessing fast or exact, or run on a CUDA GPU with torch "
                         "and torchvision (pip install torchvision)")


# ---- one batch -----------------------------------------------------------------------------------
def _gpu_route(path: str, keys: Sequence[Preprocessing]) -> bytes | None:
    """The file's bytes when it takes the GPU route, else None (it then takes ``exact``'s, whose
    decode and geometry checks give the CPU pipelines' errors): a plain RGB/grey JPEG (no Adobe
    RGB/CMYK transform) ending in its end-of-image marker, bilinear/bicubic geometries that
    :func:`geometry` accepts."""
    from PIL import Image

    if any(k.interpolation not in GPU_INTERPOLATIONS for k in keys):
        return None
    try:
        with Image.open(path) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            if im.mode == "RGB" and im.info.get("adobe_transform") == 0:
                return None
            size = im.size
        check_geometry(size, path)
        for k in keys:
            geometry(size, k.input_size, k.crop_pct, path)
        with open(path, "rb") as f:
            data = f.read()
    except Exception:  # noqa: BLE001 — the exact route names the problem
        return None
    return data if data.rstrip(b"\0").endswith(EOI) and data.startswith(b"\xff\xd8") else None


def decode_crops(paths: Sequence[str], keys: Sequence[Preprocessing],
                 device: str = "cuda") -> dict[int, list[np.ndarray]]:
    """uint8 [S, S, 3] host crops, one per key, of the files among ``paths`` that take the GPU
    route and that nvJPEG decodes, by position in ``paths``; the others are absent (the caller
    prepares them by the ``exact`` route). One batched decode; if it fails, one call per file,
    so one file nvJPEG refuses costs only itself."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    todo: list[tuple[int, str, Any]] = []
    for j, p in enumerate(paths):
        data = _gpu_route(str(p), keys)
        if data is not None:
            todo.append((j, str(p), torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    if not todo:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision ≥ 0.29's deprecation notice
        try:
            decoded: list[Any] = list(decode_jpeg([d for _, _, d in todo],
                                                  mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 — find the file(s) it refused
            decoded = []
            for _, _, d in todo:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except Exception:  # noqa: BLE001 — that file takes the exact route
                    decoded.append(None)
    per_key: list[list[Any]] = [[] for _ in keys]
    got: list[int] = []
    for (j, p, _), t in zip(todo, decoded, strict=True):
        if t is None or t.ndim != 3 or t.shape[0] != 3:
            continue
        try:
            crops = [crop_tensor(t, k, p) for k in keys]
        except AffeqError:
            continue  # (already checked) the exact route raises it with its own message
        for lst, c in zip(per_key, crops, strict=True):
            lst.append(c)
        got.append(j)
    if not got:
        return {}
    host = [torch.stack(lst).cpu().numpy() for lst in per_key]  # one copy per key
    return {j: [h[i] for h in host] for i, j in enumerate(got)}
