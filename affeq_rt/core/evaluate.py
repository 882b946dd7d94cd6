"""evaluate_heads: T stacked folded heads scored on n feature rows, tile by tile, on either backend.

Top-1 / top-5 counts, argmax and packed top-1 correctness bits, never holding the n x T x K logits.
Ties go to the lowest class index. Features with NaN or Inf are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from affeq_rt.core.backends import resolve_device
from affeq_rt.core.checks import check_features, host
from affeq_rt.core.kernels import backend_for
from affeq_rt.errors import AffeqError

__all__ = ["HeadsResult", "evaluate_heads"]


@dataclass
class HeadsResult:
    """Per-head results of :func:`evaluate_heads`.

    ``top1``/``top5``: int64 ``[T]`` hit counts over labelled rows; ``pred``: int32 ``[T, n]``;
    ``correct``: uint8 ``[T, ceil(n/8)]`` top-1 hits packed with ``np.packbits`` bit order
    (``np.unpackbits(correct, axis=1, count=n)`` restores them); ``labeled``: rows with label ≥ 0.
    """

    top1: np.ndarray
    top5: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    n: int
    labeled: int
    device: str

    @property
    def top1_acc(self) -> np.ndarray:
        """Top-1 accuracy per head over the labelled rows (NaN when none are labelled)."""
        return self.top1 / self.labeled if self.labeled else np.full(self.top1.shape, np.nan)

    @property
    def top5_acc(self) -> np.ndarray:
        """Top-5 accuracy per head over the labelled rows (NaN when none are labelled)."""
        return self.top5 / self.labeled if self.labeled else np.full(self.top5.shape, np.nan)

    def correct_bits(self) -> np.ndarray:
        """Unpacked top-1 correctness, bool ``[T, n]``."""
        return np.unpackbits(self.correct, axis=1, count=self.n).astype(bool)


def _check_eval(
    X: Any, W: Any, b: Any, labels: Any
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    check_features(X, None)
    n, d = X.shape
    W, b, labels = host(W), host(b), host(labels)
    if W.ndim != 3 or W.shape[2] != d:
        raise AffeqError(
            f"heads have shape {W.shape}, expected [T, K, {d}] for features of width {d}",
            "stack the folded heads as W[T, K, d]",
        )
    T, K = W.shape[:2]
    if K < 1:
        raise AffeqError("heads have no classes (K = 0)", "pass heads with at least one class")
    if b.shape != (T, K):
        raise AffeqError(f"biases have shape {b.shape}, expected {(T, K)}", "pass b[T, K]")
    if labels.shape != (n,):
        raise AffeqError(
            f"labels have shape {labels.shape}, expected ({n},)", "pass one label per row"
        )
    if not np.issubdtype(W.dtype, np.floating) or not np.issubdtype(b.dtype, np.floating):
        raise AffeqError("heads and biases must be floating point", "pass float32 arrays")
    if not np.issubdtype(labels.dtype, np.integer):
        raise AffeqError(
            f"labels have dtype {labels.dtype}, expected integers", "pass int64 labels"
        )
    W = np.ascontiguousarray(W, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < -1 or labels.max() >= K):
        raise AffeqError(
            f"labels span {labels.min()}..{labels.max()}, outside -1..{K - 1}",
            "use class indices 0..K-1 and -1 for unknown",
        )
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise AffeqError("heads or biases contain NaN or Inf", "refit the maps that produced them")
    return X, W, b, labels


def evaluate_heads(
    X: Any, W: Any, b: Any, labels: Any, device: str = "auto", tile_rows: int = 0
) -> HeadsResult:
    """Top-1/top-5 hits, argmax and packed top-1 bits of heads ``W[T,K,d]``, ``b[T,K]`` on X.

    Labels ``-1`` are unknown (never a hit). Ties resolve to the lowest class index. Work is tiled
    over rows (and head groups), so memory is bounded by the tile, not by n x T x K.
    """
    X, W, b, labels = _check_eval(X, W, b, labels)
    dev = resolve_device(device)
    top1, top5, pred, correct = backend_for(dev).evaluate(X, W, b, labels, int(tile_rows))
    return HeadsResult(
        top1=np.asarray(top1),
        top5=np.asarray(top5),
        pred=np.asarray(pred),
        correct=np.asarray(correct),
        n=int(X.shape[0]),
        labeled=int((labels >= 0).sum()),
        device=dev,
    )
