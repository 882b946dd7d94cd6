"""Where the long commands run: the executor protocol that ``extract``, ``fit`` and ``evaluate``
dispatch to (None = this process; ``affeq_rt.dist.RayExecutor`` = a Ray cluster).

The method layer defines what an executor must do; the executors themselves live above it
(``affeq_rt/dist``), so the method never imports them. Each call does the same work as the local
code path and must give the same result: a byte-identical store, the same Gram sums merged in shard
order, the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from affeq_rt.progress import Progress


@runtime_checkable
class Executor(Protocol):
    """What a non-local executor provides (see ``affeq_rt.dist.RayExecutor``)."""

    name: str

    def extract_into(self, writer: Any, samples: Sequence[Any], images: Any,
                     progress: Progress | None) -> None:
        """Run every network of ``writer.cfg`` over ``samples`` from ``writer.samples_done`` and
        commit the rows through ``writer`` (a ``StoreWriter``) in sample order."""

    def accumulate(self, rows: Any, holdout: float, seed: int, device: str,
                   folder: Path | None, progress: Progress | None) -> Any:
        """The ``method.fit.Accumulated`` of an image row source (checkpoints under ``folder``)."""

    def evaluate_sources(self, store: Any, maps: Any, chosen: Sequence[str], device: str,
                         progress: Progress | None) -> list[Any]:
        """One ``core.evaluate.HeadsResult`` per source in ``chosen`` (in that order)."""
