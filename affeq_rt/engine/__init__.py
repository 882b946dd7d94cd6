"""The pass engine: one way to walk rows in shards and feed statistics, here or on a cluster.

A pass walks a row source (arrays, a feature store, images decoded once) in shards on a fixed grid
and feeds *reducers* (``engine.reducer.Reducer``). An executor (``engine.executor.Executor``: one
method, ``run``) brings the reducers over every shard, in place or on workers and merged in shard
order; ``engine.run.run_pass`` adds the one checkpoint format (``engine.checkpoint``), resume and
progress. The reducers themselves (Gram, held-out rows, store writer, head tally, …) live with the
commands that use them (``method.reducers``); the Ray executor lives in ``affeq_rt.cluster``.
"""

from affeq_rt.engine.checkpoint import PassCheckpoint
from affeq_rt.engine.executor import Executor, LocalExecutor, grid, on_grid
from affeq_rt.engine.reducer import Chunk, Reducer, Rows
from affeq_rt.engine.run import Pass, run_pass

__all__ = ["Chunk", "Executor", "LocalExecutor", "Pass", "PassCheckpoint", "Reducer", "Rows",
           "grid", "on_grid", "run_pass"]
