"""Type stubs of affeq_rt._core, the CPU kernels of the compiled core (OpenBLAS + OpenMP)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__version__: str

def backend() -> str: ...
def blas_config() -> str: ...
def num_threads() -> int: ...

def gram_ingest(
    buf: npt.NDArray[np.float64],
    nbuf: int,
    X: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    start: int,
    ref: npt.NDArray[np.float64],
    colsum: npt.NDArray[np.float64],
) -> tuple[int, int]:
    """Copy finite rows X[start:] into buf[nbuf:] ([cap, d] float64, C order) as x - ref, adding
    them to colsum; stops when buf is full. Returns (next unread row, rows skipped for NaN/Inf).
    Every array is checked (dtype, shape, C order, writability): ValueError, never a copy."""

def gram_syrk_update(
    S: npt.NDArray[np.float64],
    Y: npt.NDArray[np.float64],
    ybar: npt.NDArray[np.float64],
    delta: npt.NDArray[np.float64],
    f: float,
) -> None:
    """Upper triangle of S [d, d] += YᵀY − m·ybar ybarᵀ + f·delta deltaᵀ (OpenBLAS dsyrk/dgemm,
    float64) for the shifted block Y [m, d]; m may be 0."""

def evaluate(
    X: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    W: npt.NDArray[np.float32],
    b: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    tile_rows: int = 0,
    scan: bool = True,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.uint8]
]: ...
