"""What one Ray worker actor does: run the shards of a pass through fresh reducers.

Plain Python (``ray.remote`` wraps it in ``cluster.ray``), so it is testable without Ray. A worker
unpickles the pass's rows once (an image source opens its networks here, once, and refuses exports
other than the driver's) and keeps them for the whole run; for each shard it starts the reducers
afresh (``Reducer.fresh``), feeds them the shard's chunks and returns their ``state()``: the one
format every reducer has, merged by the driver in shard order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from affeq_rt.engine.reducer import Reducer, Rows, State


class Worker:
    """One worker's rows (and the sessions they open) and the shard function the driver calls."""

    def __init__(self, rows: Rows, env: Mapping[str, str] | None = None) -> None:
        os.environ.update(env or {})  # the driver's AFFEQ_RT_*/hub settings (registry, home)
        self.rows = rows

    def start(self) -> int:
        """Open what the rows need now (all workers in parallel, before any shard) and return
        this worker's process id (the tests kill workers by it)."""
        if hasattr(type(self.rows), "networks"):  # an image source: export check, sessions
            _ = self.rows.networks
        return os.getpid()

    def run_shard(self, start: int, stop: int, templates: Mapping[str, Reducer]
                  ) -> dict[str, State]:
        """The states of fresh reducers fed samples ``start``…``stop``."""
        reducers = {k: t.fresh() for k, t in templates.items()}
        for c in self.rows.chunks(start, stop):
            for r in reducers.values():
                r.update(c)
        return {k: r.state() for k, r in reducers.items()}


def merge_states(reducers: Mapping[str, Reducer], states: Mapping[str, State]) -> None:
    """Merge a shard's states into ``reducers`` (each loaded into a fresh one first)."""
    for k, r in reducers.items():
        part = r.fresh()
        part.load(states[k])
        r.merge(part)


def run_locally(rows: Rows, reducers: Mapping[str, Any], shards: list[tuple[int, int]]) -> None:
    """The worker path without Ray, in this process: each shard through fresh reducers and merged
    in order (what the tests compare the in-place path with)."""
    w = Worker(rows)
    for a, b in shards:
        merge_states(reducers, w.run_shard(a, b, {k: r.fresh() for k, r in reducers.items()}))
