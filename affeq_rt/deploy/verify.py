"""Verifying a hybrid before it is written: its logits against ``C_B(M·F_A(x))`` from the parts.

The reference runs A's ``features.onnx``, the map in float64 and B's ``classifier.onnx`` (or B's
head arrays in float64), on real photographs (scikit-image's, else the fit images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affeq_rt.data.preprocess import crop, load_image, normalize, preprocess_key, sample_photo
from affeq_rt.data.readers import IMAGE_EXTS
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import BackboneSpec, Preprocessing

# fp32: the fold changes the float32 summation order (W_B·M is summed in float64 and rounded once,
# the parts round M·F and then W_B·(·)); relative to the largest logit that moves results by
# ~1e-6 for well-conditioned maps and up to ~1e-5 for min-norm maps with large weights.
TOL_FP32 = 1e-4
# fp16: weights and activations carry an 11-bit mantissa (2^-11 ≈ 5e-4 per rounding) through a deep
# network; errors of 1-3 % of the largest logit are normal, so top-1 agreement is what is checked:
# on every image whose reference top-1/top-2 margin exceeds TOP1_MARGIN of the logit scale (closer
# calls are near-ties that fp16 rounding may legitimately reorder).
TOL_FP16 = 5e-2
TOP1_MARGIN = 1e-2
VERIFY_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry",
                 "hubble_deep_field", "colorwheel", "camera", "coins", "moon", "clock", "text")
MAX_FALLBACK_IMAGES = 8


@dataclass
class Verification:
    """Outcome of checking the hybrid against its separate parts."""

    max_rel: float
    tolerance: float
    images: list[str]
    top1_agree: int
    top1_checked: int
    fp16: bool
    provider: str = "CPUExecutionProvider"

    @property
    def passed(self) -> bool:
        """Within tolerance and (fp16) top-1 agreement on every clear-margin image."""
        return self.max_rel <= self.tolerance and self.top1_agree == self.top1_checked

    def to_dict(self) -> dict[str, Any]:
        """JSON form for metadata."""
        return {"max_rel": self.max_rel, "tolerance": self.tolerance, "n_images": len(self.images),
                "images": self.images, "top1_agree": self.top1_agree,
                "top1_checked": self.top1_checked, "fp16": self.fp16, "provider": self.provider}


def default_tolerance(fp16: bool) -> float:
    """TOL_FP16 or TOL_FP32."""
    return TOL_FP16 if fp16 else TOL_FP32


def first_images(folder: str | os.PathLike | None, n: int = MAX_FALLBACK_IMAGES) -> list[str]:
    """Up to ``n`` image files of ``folder`` (verification fallback without scikit-image)."""
    if folder is None or not Path(folder).is_dir():
        return []
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    return [str(p) for p in files[:n]]


def verification_inputs(
    spec: BackboneSpec | Preprocessing, names: Sequence[str] = VERIFY_PHOTOS,
    paths: Sequence[str | os.PathLike] = (),
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Real photos preprocessed for A: float32 [n,3,S,S], the uint8 [n,S,S,3] crops, their names.

    scikit-image's sample photos when it is installed, else ``paths`` (e.g. the fit images).
    """
    imgs: list[tuple[str, Image.Image]] = []
    for n in names:
        try:
            imgs.append((n, sample_photo(n)))
        except ImportError:  # no scikit-image: fall back to ``paths``
            break
        except Exception:  # a sample that needs a download (pooch) is simply skipped
            continue
    for p in paths:
        if len(imgs) >= MAX_FALLBACK_IMAGES:
            break
        imgs.append((Path(p).name, load_image(p)))
    if not imgs:
        raise AffeqError("no real images to verify the hybrid on",
                         "install scikit-image (pip install 'affeq-rt[demo]') or pass --fit-on DIR")
    pre = preprocess_key(spec)
    u8 = [crop(im, pre) for _, im in imgs]
    fl = [normalize(c, pre.mean, pre.std) for c in u8]
    return np.stack(fl), np.stack(u8), [n for n, _ in imgs]


def _run(path: str | os.PathLike, feed: np.ndarray) -> list[np.ndarray]:
    """Every output of the single-input ONNX model at ``path`` on ``feed`` (CPU session)."""
    sess = create_session(path, provider="cpu")
    return sess.run_feeds({sess.input_names[0]: feed})


def reference_logits(features_path: str | os.PathLike, m_weight: np.ndarray, m_bias: np.ndarray,
                     head: Head, x: np.ndarray,
                     classifier_path: str | os.PathLike | None = None) -> np.ndarray:
    """C_B(M·F_A(x)) from the separate parts: A's features session, the map in float64, then B's
    classifier (its ``classifier.onnx`` session where given, else its head arrays in float64)."""
    fa = _run(features_path, x)[0]
    mapped = (fa.astype(np.float64) @ np.asarray(m_weight, np.float64).T
              + np.asarray(m_bias, np.float64))
    if classifier_path is not None and Path(classifier_path).is_file():
        return _run(classifier_path, mapped.astype(np.float32))[0].astype(np.float64)
    return mapped @ np.asarray(head.weight, np.float64).T + np.asarray(head.bias, np.float64)


def verify(path: str | os.PathLike, reference: np.ndarray, feed: np.ndarray, names: list[str],
           fp16: bool, tolerance: float | None = None) -> Verification:
    """Run the hybrid file on ``feed`` and compare its logits with ``reference`` [n, K]."""
    logits, probs = _run(path, feed)
    ref = np.asarray(reference, np.float64)
    got = np.asarray(logits, np.float64)
    if got.shape != ref.shape:
        raise InternalError(f"hybrid gives logits {got.shape}, the parts give {ref.shape}")
    scale = max(float(np.abs(ref).max()), 1e-12)
    max_rel = float(np.abs(got - ref).max() / scale)
    if not np.allclose(np.asarray(probs, np.float64).sum(1), 1.0, atol=1e-3):
        max_rel = float("inf")  # probabilities must be a softmax over the logits
    tol = default_tolerance(fp16) if tolerance is None else tolerance
    # Top-1 is compared wherever the reference's top-1/top-2 margin is clear (see TOP1_MARGIN).
    srt = np.sort(ref, axis=1)
    clear = (srt[:, -1] - srt[:, -2]) > min(2 * tol, TOP1_MARGIN) * scale
    agree = int((got.argmax(1) == ref.argmax(1))[clear].sum())
    return Verification(max_rel, tol, list(names), agree, int(clear.sum()), fp16)
