"""Head files (``head.safetensors`` of exports and feature stores): a classifier as arrays."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import atomic_path


def save_head(path: str | os.PathLike, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write a head (``weight`` [K, d], ``bias`` [K], float32) as safetensors, atomically."""
    from safetensors.numpy import save_file

    tensors = {"weight": np.ascontiguousarray(weight, np.float32),
               "bias": np.ascontiguousarray(bias, np.float32).reshape(-1)}
    with atomic_path(path, need=sum(t.nbytes for t in tensors.values())) as tmp:
        save_file(tensors, str(tmp))


def load_head(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a head file written by :func:`save_head` (an export's or a store's)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        return t["weight"], t["bias"]
    except FileNotFoundError:
        raise AffeqError(f"head file {path} does not exist", "re-run the export/extract") from None
    except (SafetensorError, KeyError, OSError) as e:
        raise AffeqError(f"head file {path} is corrupt ({e})",
                         "re-run the export/extract") from None


@dataclass(frozen=True)
class Head:
    """A linear classifier as arrays, in ImageNet-1k class order: logit ``c`` is class ``c``.

    TF-slim heads carry a leading background class (registry ``label_offset`` = 1); it is
    stripped here, once, when the head is loaded, so nothing downstream handles offsets.
    ``label_offset`` remembers how many leading rows the file had (for writing hybrids whose
    outputs must keep the original layout).
    """

    weight: np.ndarray  # float32 [K, d] (float64 where folded into a map: io.maps.fold_head)
    bias: np.ndarray  # float32 [K] (likewise)
    label_offset: int = 0

    def __post_init__(self) -> None:
        w, b = self.weight, self.bias
        if w.ndim != 2 or b.ndim != 1 or w.shape[0] != b.shape[0]:
            raise InternalError(f"head arrays do not fit: weight {w.shape}, bias {b.shape}")

    @property
    def num_classes(self) -> int:
        """Classes after stripping the background rows."""
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        """Feature width d."""
        return int(self.weight.shape[1])

    @classmethod
    def from_raw(cls, weight: np.ndarray, bias: np.ndarray, label_offset: int = 0) -> Head:
        """A head from a file's full rows, dropping the ``label_offset`` background rows."""
        if label_offset < 0 or weight.shape[0] <= label_offset:
            raise AffeqError(f"head has {weight.shape[0]} classes, too few for label offset "
                             f"{label_offset}", "check label_offset/num_classes in the spec")
        return cls(np.ascontiguousarray(weight[label_offset:], np.float32),
                   np.ascontiguousarray(np.reshape(bias, -1)[label_offset:], np.float32),
                   label_offset)

    @classmethod
    def load(cls, path: str | os.PathLike, label_offset: int = 0) -> Head:
        """Read ``head.safetensors`` and strip ``label_offset`` background rows."""
        w, b = load_head(path)
        return cls.from_raw(w, b, label_offset)
