"""ImageNet-1k class names (from timm's offline tables) and top-k decoding of logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from affeq_rt.errors import InternalError


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in index order (e.g. 281 → ``tabby, tabby cat``)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def class_name(index: int) -> str:
    """Description of ImageNet class ``index`` (``class <i>`` outside 0–999)."""
    names = imagenet_names()
    return names[index] if 0 <= index < len(names) else f"class {index}"


@dataclass(frozen=True)
class TopK:
    """One image's top classes: ImageNet indices (label offset removed), names, probabilities."""

    indices: tuple[int, ...]
    names: tuple[str, ...]
    probs: tuple[float, ...]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def topk(logits: np.ndarray, k: int = 5, label_offset: int = 0,
         names: Sequence[str] | None = None) -> list[TopK]:
    """Top-``k`` classes of each row of ``logits`` [N, K]; ties go to the lower index.

    ``label_offset`` = 1 for 1001-class TF-slim heads: logit ``c + 1`` is ImageNet class ``c``
    and the background logit is dropped before the softmax. ``names`` (one per class after the
    offset) replaces the ImageNet-1k names, e.g. for heads of other label sets.
    """
    z = np.atleast_2d(np.asarray(logits))[:, label_offset:]
    p = softmax(z)
    if names is not None and len(names) != p.shape[1]:
        raise InternalError(f"{len(names)} class names for {p.shape[1]} classes")
    k = max(1, min(int(k), p.shape[1]))
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    name = class_name if names is None else (lambda i: str(names[i]))
    return [TopK(tuple(int(i) for i in row), tuple(name(int(i)) for i in row),
                 tuple(float(p[r, i]) for i in row)) for r, row in enumerate(order)]
