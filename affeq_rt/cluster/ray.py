"""The Ray executor: any pass of the engine (``extract``, ``fit``, ``evaluate``, ``similarity``)
with its shards spread over Ray actors. It knows nothing of the operation.

The driver (the process that runs the command) owns every output file and the reducers; worker
actors (``cluster.worker.Worker``) unpickle the pass's rows once (an image source opens its
onnxruntime sessions there, once) and run each shard through fresh reducers, returning their
exact ``state()``. The driver merges the states **in shard order** (``Reducer.merge``) and commits
after each shard (``engine.run_pass``: checkpoints, store commits), so the outcome never depends on
which worker ran what, or on how often one died. A pass that starts at sample 0 runs its first
shard alone first: references taken from the first rows (the row norms' shift) are then the same
on every worker.

A worker that dies (killed, out of memory, node lost) is replaced and its shard redone; a shard
that kills three workers stops the run with an error. Reducer states travel through Ray's object
store: O(d²) Gram states, a shard's feature rows for extraction (at most ``shard_size`` images).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from affeq_rt.cluster.worker import Worker, merge_states
from affeq_rt.engine import Executor, LocalExecutor
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.progress import Progress

Shard = tuple[int, int]
EXECUTORS = ("local", "ray")
MAX_ATTEMPTS = 3  # a shard whose worker dies this often stops the run
ENV_KEYS = ("AFFEQ_RT_HOME", "AFFEQ_RT_MODELS", "AFFEQ_RT_OTHER_LABELS", "HF_HUB_CACHE",
            "HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME")


def import_ray() -> Any:
    """The ``ray`` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise AffeqError("--executor ray needs Ray, which is not installed",
                         "pip install 'affeq-rt[ray]'") from None
    return ray


def _reraise_cause(e: BaseException) -> None:
    """Raise a worker's AffeqError/InternalError as itself (one line, not Ray's traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, (AffeqError, InternalError)):
        raise cause from None
    raise e


class _Board:
    """Per-worker state for the progress display: one line of what each worker does."""

    def __init__(self, bar: Progress, workers: int) -> None:
        self.bar = bar
        self.state = ["starting"] * workers
        self.restarts = 0

    def set(self, i: int, what: str) -> None:
        self.state[i] = what
        busy = sum(s not in ("idle", "starting") for s in self.state)
        line = f"{busy}/{len(self.state)} workers busy: " + ", ".join(
            f"w{k} {s}" for k, s in enumerate(self.state))
        if self.restarts:
            line += f"; {self.restarts} restarted"
        self.bar.step(line)


class RayExecutor:
    """Run passes on a Ray cluster (``address``: None starts a local one, ``"auto"`` joins the
    running one, ``HOST:PORT`` a given one) with ``workers`` actors of ``gpus_per_worker`` GPUs and
    ``cpus_per_worker`` CPUs each. ``shard_size`` (samples; None: the pass's default) fixes the
    shard grid; a checkpointed pass keeps the grid it started with."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 2,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                 shard_size: int | None = None) -> None:
        self.ray = import_ray()
        if workers < 1:
            raise AffeqError(f"--ray-workers must be at least 1, got {workers}",
                             "pass --ray-workers N")
        if gpus_per_worker < 0 or cpus_per_worker < 0:
            raise AffeqError("--gpus-per-worker and CPUs per worker must be ≥ 0",
                             "pass e.g. --gpus-per-worker 1")
        if shard_size is not None and shard_size < 1:
            raise AffeqError(f"--shard-size must be positive, got {shard_size}",
                             "pass e.g. --shard-size 1024")
        self.address = address
        self.workers = int(workers)
        self.gpus_per_worker = float(gpus_per_worker)
        self.cpus_per_worker = float(cpus_per_worker)
        self.shard_size = shard_size
        self.pids: list[int] = []  # the live workers' process ids (tests kill them)
        self.restarts = 0  # workers replaced after dying
        self.start_s = 0.0  # seconds to start the last run's workers and open their sessions
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
        except ConnectionError as e:
            raise AffeqError(f"cannot reach the Ray cluster at {self.address}: {e}",
                             "start it with `ray start --head`, or check --address") from None

    def _capacity(self) -> int:
        """How many workers the cluster can place at once (actors beyond it would wait forever)."""
        res = self.ray.cluster_resources()
        fits = []
        for key, need in (("GPU", self.gpus_per_worker), ("CPU", self.cpus_per_worker)):
            if need > 0:
                fits.append(int(float(res.get(key, 0.0)) // need))
        cap = min(fits) if fits else self.workers
        if cap < 1:
            raise AffeqError(f"the Ray cluster has {res.get('GPU', 0):g} GPUs and "
                             f"{res.get('CPU', 0):g} CPUs: not one worker of "
                             f"{self.gpus_per_worker:g} GPUs and {self.cpus_per_worker:g} CPUs "
                             "fits", "lower --gpus-per-worker, or add nodes (ray status)")
        return cap

    def _actor(self, args: tuple) -> Any:
        env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
        cls = self.ray.remote(Worker).options(num_cpus=self.cpus_per_worker,
                                              num_gpus=self.gpus_per_worker, max_restarts=0)
        return cls.remote(*args, env)

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        """``ray.get`` outside the task loop: a worker's error as itself, a death as one line."""
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            _reraise_cause(e)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
            raise AffeqError(f"a Ray worker died while {what} (opening the networks)",
                             "check the workers' memory and logs (ray logs)") from None
        raise InternalError("unreachable")

    # -- the one method of the executor contract -------------------------------------------
    def run(self, rows: Any, reducers: Mapping[str, Any], shards: Sequence[Shard],
            on_commit: Callable[[int], None], progress: Progress) -> None:
        """Every shard on the workers through fresh reducers; their states merged into
        ``reducers`` in shard order, ``on_commit(stop)`` after each. A pass that starts at sample
        0 runs its first shard alone first, so that references taken from the first rows (the
        row norms' shift) are the prefix's before the other shards start."""
        shards = list(shards)
        if not shards:
            return
        results: dict[Shard, dict[str, Any]] = {}
        order = deque(shards)

        def done(task: Shard, states: dict[str, Any]) -> None:
            results[task] = states
            progress.advance(task[1] - task[0])
            while order and order[0] in results:
                sh = order.popleft()
                merge_states(reducers, results.pop(sh))
                on_commit(sh[1])

        def label(t: Shard) -> str:
            return f"samples {t[0]}–{t[1]}"

        with _Pool(self, (rows,), progress, len(shards)) as pool:
            first = [shards.pop(0)] if shards[0][0] == 0 else []
            for batch in (first, shards):
                if not batch:
                    continue
                tref = self.ray.put({k: r.fresh() for k, r in reducers.items()})
                pool.map(batch, lambda actor, t, tref=tref: actor.run_shard.remote(t[0], t[1],
                                                                                   tref),
                         done, label)
        if order:
            raise InternalError(f"{len(order)} shards were never merged")


class _Pool:
    """The worker actors of one run (``with``: started, then killed), each built with ``args``;
    :meth:`map` runs tasks on them, replacing dead workers and redoing their task."""

    def __init__(self, ex: RayExecutor, args: tuple, bar: Progress, tasks: int) -> None:
        self.ex, self.args, self.ray = ex, args, ex.ray
        ex._connect()
        self.size = min(ex.workers, max(tasks, 1), ex._capacity())
        self.board = _Board(bar, self.size)
        self.actors: list[Any] = []

    def __enter__(self) -> _Pool:
        t0 = time.perf_counter()
        try:
            self.actors = [self.ex._actor(self.args) for _ in range(self.size)]
            self.ex.pids = self.ex._get([a.start.remote() for a in self.actors], "starting")
        except BaseException:
            self.__exit__()
            raise
        self.ex.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.ex.pids = []

    def _replace(self, i: int) -> None:
        self.ray.kill(self.actors[i])
        self.actors[i] = self.ex._actor(self.args)
        self.ex.pids[i] = self.ex._get([self.actors[i].start.remote()], "starting")[0]
        self.ex.restarts += 1
        self.board.restarts += 1
        self.board.set(i, "restarted")

    def map(self, tasks: Sequence[Any], call: Callable[[Any, Any], Any],
            done: Callable[[Any, Any], None], label: Callable[[Any], str]) -> None:
        """``call(actor, task)`` for every task, ``done(task, result)`` on the driver as each
        finishes (completion order)."""
        ray = self.ray
        queue: deque = deque(tasks)
        idle = deque(range(self.size))
        running: dict[Any, tuple[int, Any]] = {}
        attempts: dict[Any, int] = {}
        while queue or running:
            while queue and idle:
                i, task = idle.popleft(), queue.popleft()
                running[call(self.actors[i], task)] = (i, task)
                self.board.set(i, label(task))
            ready, _ = ray.wait(list(running), num_returns=1)
            i, task = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                attempts[task] = attempts.get(task, 0) + 1
                if attempts[task] >= MAX_ATTEMPTS:
                    raise AffeqError(f"{MAX_ATTEMPTS} Ray workers died on {label(task)}",
                                     "check the workers' memory and logs (ray logs)") from None
                self._replace(i)
                queue.appendleft(task)
                idle.append(i)
                continue
            except ray.exceptions.RayTaskError as e:
                _reraise_cause(e)
            idle.append(i)
            self.board.set(i, "idle")
            done(task, result)


def executor_for(name: str, address: str | None = None, workers: int = 2,
                 gpus_per_worker: float = 0.0, shard_size: int | None = None) -> Executor:
    """The executor a command-line choice names: a ``LocalExecutor`` or a :class:`RayExecutor`."""
    key = name.strip().lower()
    if key not in EXECUTORS:
        raise AffeqError(f"unknown executor {name!r}", f"use one of {', '.join(EXECUTORS)}")
    if key == "local":
        return LocalExecutor()
    return RayExecutor(address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                       shard_size=shard_size)


