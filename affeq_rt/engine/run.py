"""``run_pass``: one resumable pass of reducers over rows, on any executor.

The grid is fixed by the data, never the clock: shards are multiples of the rows' ``grain``. After
every shard the pass asks its checkpoint whether a commit is ``due`` and saves then (and at the
end). ``PassCheckpoint`` commits when a shard ends on or past a multiple of its ``every``, so a
resumed pass feeds exactly the chunks an uninterrupted one would have after the same point (saving
flushes buffered sums, which is why those positions must not depend on timing). An output that is
its own checkpoint (a feature store: ``method.extract``) may commit by the clock, since what it
saves is the rows themselves. A Ctrl-C leaves the last committed checkpoint; the rerun resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from affeq_rt.engine.executor import Executor, LocalExecutor, grid, on_grid
from affeq_rt.engine.reducer import Reducer, Rows
from affeq_rt.progress import Progress, or_silent


class Checkpoint(Protocol):
    """Where a pass resumes from and how it commits (``engine.checkpoint.PassCheckpoint``)."""

    @property
    def done(self) -> int:
        """Samples the saved state covers (0: start afresh)."""
        ...

    @property
    def shard(self) -> int | None:
        """The shard size the saved pass ran with (None: none saved; a resume keeps its grid)."""
        ...

    def restore(self, reducers: Mapping[str, Reducer]) -> None:
        """Load the saved state into fresh ``reducers``."""
        ...

    def due(self, last: int, stop: int, n: int) -> bool:
        """Whether to commit after a shard ended at ``stop`` (the previous one at ``last``)."""
        ...

    def save(self, reducers: Mapping[str, Reducer], done: int, shard: int) -> None:
        """Commit the reducers' states covering samples ``0…done``."""
        ...


SHARD = 20000  # samples per shard when neither the caller nor the executor says


@dataclass
class Pass:
    """What :func:`run_pass` did: the samples covered and where it started (resumed)."""

    done: int
    resumed_from: int
    shard: int


def run_pass(rows: Rows, reducers: Mapping[str, Reducer], *, executor: Executor | None = None,
             checkpoint: Checkpoint | None = None, shard: int | None = None,
             progress: Progress | None = None, task: str = "pass") -> Pass:
    """Bring ``reducers`` (fresh) over every sample of ``rows``.

    ``shard``: samples per shard (None: the executor's ``shard_size``, else :data:`SHARD`),
    rounded up to the rows' grain; a resumed checkpoint keeps the grid it was started with.
    """
    ex = executor if executor is not None else LocalExecutor()
    size = shard or ex.shard_size or SHARD
    start = 0
    if checkpoint is not None:
        checkpoint.restore(reducers)
        start = checkpoint.done
        size = checkpoint.shard or size
    size = on_grid(size, rows.grain)
    n = int(rows.n)
    bar = or_silent(progress)
    bar.start(task, total=n, done=start)
    last = start

    def commit(stop: int) -> None:
        nonlocal last
        if checkpoint is not None and checkpoint.due(last, stop, n):
            checkpoint.save(reducers, stop, size)
        last = stop

    ex.run(rows, reducers, grid(start, n, size), commit, bar)
    bar.done()
    return Pass(max(last, start), start, size)
