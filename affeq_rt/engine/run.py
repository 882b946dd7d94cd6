"""``run_pass``: one resumable pass of reducers over rows, on any executor.

The grid is fixed by the data, never the clock: shards are multiples of the rows' ``grain``, and a
checkpoint is committed when a shard ends on or past a multiple of ``checkpoint_every`` (and at
the end), so a resumed pass feeds exactly the chunks an uninterrupted one would have after the
same point. Saving flushes any buffered sums (the Gram's blocks), which is why the positions must
not depend on timing. A Ctrl-C leaves the last committed checkpoint; the rerun resumes from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from affeq_rt.engine.checkpoint import PassCheckpoint
from affeq_rt.engine.executor import Executor, LocalExecutor, grid, on_grid
from affeq_rt.engine.reducer import Reducer, Rows
from affeq_rt.progress import Progress, or_silent


@dataclass
class Pass:
    """What :func:`run_pass` did: the samples covered and where it started (resumed)."""

    done: int
    resumed_from: int
    shard: int


def run_pass(rows: Rows, reducers: Mapping[str, Reducer], *, executor: Executor | None = None,
             checkpoint: PassCheckpoint | None = None, checkpoint_every: int = 20000,
             shard: int | None = None, on_commit: Callable[[int], None] | None = None,
             progress: Progress | None = None, task: str = "pass", start: int = 0) -> Pass:
    """Bring ``reducers`` (fresh) over every sample of ``rows``.

    ``shard``: samples per shard (None: the executor's ``shard_size``, else ``checkpoint_every``),
    rounded up to the rows' grain; a resumed checkpoint keeps the grid it was started with.
    ``on_commit(stop)`` is called after every shard, after the checkpoint (if any) is saved.
    ``start``: the samples the reducers already cover without a checkpoint (an output that is
    its own checkpoint, as a feature store is).
    """
    ex = executor if executor is not None else LocalExecutor()
    every = max(int(checkpoint_every), 1)
    size = shard or ex.shard_size or every
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
        if checkpoint is not None and (stop // every > last // every or stop == n):
            checkpoint.save(reducers, stop, size)
        last = stop
        if on_commit is not None:
            on_commit(stop)

    ex.run(rows, reducers, grid(start, n, size), commit, bar)
    bar.done()
    return Pass(max(last, start), start, size)
