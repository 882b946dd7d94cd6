"""ImageNet-1k class names (a packaged copy of timm's offline table) and top-k decoding of logits.

The names ship as ``imagenet_classes.txt`` beside this file (one description per line, index
order), so commands that only run ONNX models never import timm (or torch) to print a label; a test
checks the copy against timm's own table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from affeq_rt.errors import InternalError

#: The 1000 ImageNet-1k descriptions, one per line in class-index order (timm's
#: ``ImageNetInfo().index_to_description``, copied so that no ONNX-only command imports timm).
NAMES_FILE = Path(__file__).with_name("imagenet_classes.txt")


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in index order (e.g. 281 → ``tabby, tabby cat``)."""
    names = tuple(NAMES_FILE.read_text(encoding="utf-8").splitlines())
    if len(names) != 1000:
        raise InternalError(f"{NAMES_FILE} holds {len(names)} class names, not 1000")
    return names


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
