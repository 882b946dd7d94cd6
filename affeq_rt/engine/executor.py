"""Executors: one contract with one method, ``run``, and the one that runs here (``LocalExecutor``).

An executor knows nothing of the operation. It is given rows, reducers and shards on a fixed grid;
it brings the reducers over every shard — in place, or on workers whose fresh reducers it merges
into them — and calls ``on_commit(stop)`` after each shard, **in shard order**. A cluster executor
(``affeq_rt.cluster.RayExecutor``) satisfies the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from affeq_rt.engine.reducer import Reducer, Rows
from affeq_rt.errors import InternalError
from affeq_rt.progress import Progress

Shard = tuple[int, int]


def grid(start: int, n: int, shard: int) -> list[Shard]:
    """Shards ``[a, b)`` of samples ``start``…``n`` on the fixed grid of multiples of ``shard``."""
    out, a = [], start
    while a < n:
        b = min((a // shard + 1) * shard, n)
        out.append((a, b))
        a = b
    return out


def on_grid(size: int, grain: int) -> int:
    """``size`` rounded up to a multiple of ``grain`` (a shard is whole chunks)."""
    grain = max(int(grain), 1)
    return max(1, -(-int(size) // grain)) * grain


@runtime_checkable
class Executor(Protocol):
    """Where a pass runs. ``shard_size``: the executor's own shard size (None: the pass's)."""

    name: str
    shard_size: int | None

    def run(self, rows: Rows, reducers: Mapping[str, Reducer], shards: Sequence[Shard],
            on_commit: Callable[[int], None], progress: Progress) -> None:
        """Make ``reducers`` cover every shard of ``rows`` (they already cover the samples before
        ``shards[0]``), calling ``on_commit(stop)`` after each shard, in order; ``progress``
        advances by samples."""
        ...


class LocalExecutor:
    """This process (with the loader's decode workers): one stream of chunks over every shard,
    each chunk fed to every reducer in place, so the sums are those of one uninterrupted loop."""

    name = "local"
    shard_size: int | None = None

    def run(self, rows: Rows, reducers: Mapping[str, Reducer], shards: Sequence[Shard],
            on_commit: Callable[[int], None], progress: Progress) -> None:
        """Feed ``rows.chunks(first, last)`` to every reducer; commit at each shard's end."""
        if not shards:
            return
        ends = [b for _, b in shards]
        k = 0
        for c in rows.chunks(shards[0][0], shards[-1][1]):
            for r in reducers.values():
                r.update(c)
            progress.advance(c.stop - c.start)
            if c.stop > ends[k]:
                raise InternalError(f"chunk {c.start}–{c.stop} crosses the shard edge {ends[k]}")
            if c.stop == ends[k]:
                on_commit(c.stop)
                k += 1
        if k != len(ends):
            raise InternalError(f"the rows ended at shard {k} of {len(ends)}")
