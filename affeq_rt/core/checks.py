"""Input checks shared by the compiled-core front ends: feature batches (numpy/cupy), slices."""

from __future__ import annotations

from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError

FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def is_cupy(x: Any) -> bool:
    """True for a cupy array (checked by module name: cupy is never imported here)."""
    return type(x).__module__.split(".")[0] == "cupy"


def host(x: Any) -> np.ndarray:
    """A NumPy view of x, copying a cupy array to the host."""
    return x.get() if is_cupy(x) else np.asarray(x)


def check_features(X: Any, dim: int | None, what: str = "features") -> None:
    """Raise AffeqError unless X is a C-contiguous float32/float16 [rows, dim] numpy/cupy array."""
    if not (isinstance(X, np.ndarray) or is_cupy(X)):
        raise AffeqError(
            f"{what} must be a numpy or cupy array, got {type(X).__name__}",
            "pass np.asarray(features, dtype=np.float32)",
        )
    if X.dtype not in FEATURE_DTYPES:
        raise AffeqError(
            f"{what} have dtype {X.dtype}, expected float32 or float16",
            "convert with X.astype(np.float32)",
        )
    if X.ndim != 2:
        raise AffeqError(
            f"{what} have shape {tuple(X.shape)}, expected [rows, dim]",
            "reshape to a 2-D [rows, dim] array",
        )
    if dim is not None and X.shape[1] != dim:
        raise AffeqError(
            f"{what} have {X.shape[1]} columns, the accumulator has {dim}",
            "feed features of the width the accumulator was created with",
        )
    if not X.flags.c_contiguous:
        raise AffeqError(f"{what} are not C-contiguous", "pass np.ascontiguousarray(X)")


def range_of(s: slice | int, dim: int, what: str) -> tuple[int, int, int]:
    """(start, stop, step) of an index or slice over ``dim`` entries; AffeqError when outside."""
    if isinstance(s, (int, np.integer)):
        i = int(s) + (dim if s < 0 else 0)
        if not 0 <= i < dim:
            raise AffeqError(
                f"{what} index {s} outside 0..{dim - 1}", "use an index inside the width"
            )
        return i, i + 1, 1
    if not isinstance(s, slice):
        raise AffeqError(
            f"{what} must be a slice or an int, got {type(s).__name__}", "pass e.g. slice(0, 2048)"
        )
    return s.indices(dim)
