"""Head files (``head.safetensors`` of exports and feature stores): a classifier as arrays."""

from __future__ import annotations

import os

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path


def save_head(path: str | os.PathLike, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write a head (``weight`` [K, d], ``bias`` [K], float32) as safetensors, atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({"weight": np.ascontiguousarray(weight, np.float32),
                   "bias": np.ascontiguousarray(bias, np.float32).reshape(-1)}, str(tmp))


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
