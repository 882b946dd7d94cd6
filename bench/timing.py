"""Shared bench timing: interleaved repeats on a shared machine, and their raw printout."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeat: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each function ``repeat`` times, interleaved (A B C A B C): the machine is shared.

    Returns wall seconds and process CPU seconds (all threads; includes BLAS/OpenMP spin-waits)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            time.sleep(0.3)  # let the previous call's BLAS worker threads stop spinning
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def print_runs(wall: dict[str, list[float]], cpu: dict[str, list[float]], digits: int) -> None:
    """Print every repeat's wall and CPU seconds as ``#`` comment lines."""
    for label, table in (("runs", wall), ("cpu-seconds", cpu)):
        print(f"#   {label}: "
              + "; ".join(f"{k} " + ",".join(f"{v:.{digits}f}" for v in vs)
                          for k, vs in table.items()), flush=True)
