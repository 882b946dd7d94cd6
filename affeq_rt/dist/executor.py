"""The Ray executor: ``extract``, ``fit`` and ``evaluate`` with their work spread over Ray actors.

The driver (the process that runs the command) owns every output file; worker actors
(``dist.worker.Worker``) own their onnxruntime sessions for the whole run. The samples are cut into
fixed shards on the store's batch grid, and results are committed **in shard order**, so the
outcome never depends on which worker ran what, or on how often one died:

- ``extract``: a worker stages its shard's rows on the store's filesystem
  (``STORE/.ray-shards/<shard>/``); the driver copies finished shards, in order, through the same
  ``StoreWriter`` a local run uses and commits after each. Row positions depend on how many
  earlier images were unreadable, known only once those are decoded; with the driver as the one
  writer the store's format, lock and resume stay exactly the local ones (a ``local`` rerun can
  finish a store a Ray run started, and the other way round). Cost: the features are written
  twice and read once more on disk.
- ``fit``: a worker reduces its shard into a fresh pair of Gram states (training, held-out) and
  saves them in ``<out>.partial/ray/``; the driver merges them in shard order into a prefix state
  it checkpoints there (exact float64 bytes), so a rerun redoes only the shards not yet merged.
- ``evaluate``: one task per source network; the worker reads the store from disk.

A worker that dies (killed, out of memory, node lost) is replaced and its shard redone; a shard
that kills three workers stops the run with an error. Features never travel through Ray's object
store; only sample lists, held-out flags, small records and evaluation results do.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.dist.worker import (
    Worker,
    shard_name,
    staged,
    state_files,
)
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import ensure_writable_dir, read_json, write_json_atomic
from affeq_rt.method.extract import ImageOptions
from affeq_rt.method.fit import (
    Accumulated,
    fit_identity,
    holdout_mask,
    model_slices,
    refuse_other_fit,
)
from affeq_rt.method.rows import source_groups
from affeq_rt.progress import Progress, or_silent

EXECUTORS = ("local", "ray")
EXTRACT_SHARD = 1024  # default images per extraction shard (rounded up to the batch grid)
FIT_SHARD = 16384  # default images per Gram shard: a state is O(d²), so fewer, larger shards
MAX_ATTEMPTS = 3  # a shard whose worker dies this often stops the run
STAGE = ".ray-shards"
ENV_KEYS = ("AFFEQ_RT_HOME", "AFFEQ_RT_MODELS", "AFFEQ_RT_OTHER_LABELS", "AFFEQ_RT_DOWNLOAD")


def import_ray() -> Any:
    """The ``ray`` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise AffeqError("--executor ray needs Ray, which is not installed",
                         "pip install 'affeq-rt[ray]'") from None
    return ray


def grid(start: int, n: int, shard: int) -> list[tuple[int, int]]:
    """Shards ``[a, b)`` of samples ``start``…``n`` on the fixed grid of multiples of ``shard``."""
    out, a = [], start
    while a < n:
        b = min((a // shard + 1) * shard, n)
        out.append((a, b))
        a = b
    return out


def on_grid(size: int, batch_size: int) -> int:
    """``size`` rounded up to a multiple of the batch size (shards are whole batches)."""
    return max(1, -(-int(size) // batch_size)) * batch_size


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
    """Run the long commands on a Ray cluster (``address``: None starts a local one, ``"auto"``
    joins the running one, ``HOST:PORT`` a given one) with ``workers`` actors of
    ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs each. ``shard_size`` (images; None: the
    command's default) fixes the shard grid; a fit keeps the grid it started with."""

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

    # -- cluster and pool -------------------------------------------------------------------
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

    def _run(self, tasks: Sequence[Any], args: tuple, call: Callable[[Any, Any], Any],
             done: Callable[[Any, Any], None], label: Callable[[Any], str],
             bar: Progress) -> None:
        """Run ``call(actor, task)`` for every task on the pool, ``done(task, result)`` on the
        driver as each finishes (in completion order); replace dead workers and redo their task."""
        ray = self.ray
        self._connect()
        queue: deque = deque(tasks)
        size = min(self.workers, max(len(queue), 1), self._capacity())
        t0 = time.perf_counter()
        actors: list[Any] = []
        board = _Board(bar, size)
        idle = deque(range(size))
        running: dict[Any, tuple[int, Any]] = {}
        attempts: dict[Any, int] = {}
        try:
            actors = [self._actor(args) for _ in range(size)]
            self.pids = self._get([a.start.remote() for a in actors], "starting")
            self.start_s = time.perf_counter() - t0
            while queue or running:
                while queue and idle:
                    i, task = idle.popleft(), queue.popleft()
                    running[call(actors[i], task)] = (i, task)
                    board.set(i, label(task))
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                i, task = running.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    attempts[task] = attempts.get(task, 0) + 1
                    if attempts[task] >= MAX_ATTEMPTS:
                        raise AffeqError(f"{MAX_ATTEMPTS} Ray workers died on {label(task)}",
                                         "check the workers' memory and logs (ray logs)"
                                         ) from None
                    ray.kill(actors[i])
                    actors[i] = self._actor(args)
                    self.pids[i] = self._get([actors[i].start.remote()], "starting")[0]
                    self.restarts += 1
                    board.restarts += 1
                    queue.appendleft(task)
                    idle.append(i)
                    board.set(i, "restarted")
                    continue
                except ray.exceptions.RayTaskError as e:
                    _reraise_cause(e)
                idle.append(i)
                board.set(i, "idle")
                done(task, result)
        finally:
            for a in actors:
                ray.kill(a)
            self.pids = []

    # -- extract ----------------------------------------------------------------------------
    def extract_into(self, writer: Any, samples: Sequence[Any], images: ImageOptions,
                     progress: Progress | None) -> None:
        """Fill ``writer`` (a ``StoreWriter``) from ``writer.samples_done`` on, shard by shard."""
        bar = or_silent(progress)
        bs = int(writer.cfg.batch_size)
        n = len(samples)
        shard = on_grid(self.shard_size or EXTRACT_SHARD, bs)
        stage = Path(writer.path) / STAGE
        shards = grid(writer.samples_done, n, shard)
        todo = []
        for a, b in shards:
            if staged(stage, a, b) is not None:  # finished by a killed run, not yet committed
                bar.advance(b - a)
            else:
                todo.append((a, b))
        order = deque(shards)

        def commit() -> None:
            while order and staged(stage, *order[0]) is not None:
                a, b = order.popleft()
                rec = staged(stage, a, b)
                d = stage / shard_name(a, b)
                for m in writer.cfg.models:
                    x = np.load(d / f"{m}.npy", mmap_mode="r")
                    if x.shape[0] != rec["rows"]:
                        raise InternalError(f"staged shard {d} has {x.shape[0]} rows of {m}")
                    writer.write(m, writer.rows, np.asarray(x))
                writer.commit(b, writer.rows + int(rec["rows"]), rec["skipped"])
                shutil.rmtree(d, ignore_errors=True)

        def done(task: tuple[int, int], _rec: dict[str, Any]) -> None:
            bar.advance(task[1] - task[0])
            commit()

        commit()
        if todo:
            ensure_writable_dir(stage)
            args = (writer.cfg.models, images, writer.cfg.exports, self.ray.put(list(samples)))
            self._run(todo, args,
                      lambda actor, t: actor.extract_shard.remote(t[0], t[1], bs, str(stage)),
                      done, lambda t: f"images {t[0]}–{t[1]}", bar)
        commit()
        if order:
            raise InternalError(f"{len(order)} shards were never staged")
        shutil.rmtree(stage, ignore_errors=True)

    # -- fit --------------------------------------------------------------------------------
    def accumulate(self, rows: Any, holdout: float, seed: int, device: str,
                   folder: Path | None, progress: Progress | None) -> Accumulated:
        """The Gram pass of an image row source, shard by shard, merged in shard order."""
        if rows.arrays() is not None or not hasattr(rows, "networks"):
            raise AffeqError("--executor ray fits from images (--data); a feature store is read "
                             "at disk speed", "drop --executor ray for fit --features")
        bar = or_silent(progress)
        names, dims, n = rows.names, rows.dims(), rows.n
        dim = sum(int(dims[m]) for m in names)
        images: ImageOptions = rows.options
        bs = int(images.batch_size)
        mask = holdout_mask(n, holdout, seed, source_groups(rows))
        ident = fit_identity(rows, holdout, seed)
        state = Path(folder) / "ray" if folder is not None else None
        shard = on_grid(self.shard_size or FIT_SHARD, bs)
        acc_t, acc_h = GramAccumulator(dim, device=device), GramAccumulator(dim, device=device)
        merged, skipped = 0, []
        if state is not None:
            ensure_writable_dir(state)
            gf = state / "grid.json"
            if gf.is_file():
                g = read_json(gf, "Ray fit checkpoint")
                refuse_other_fit(state, g.get("identity"), ident)
                shard = int(g["shard_size"])
            else:
                write_json_atomic(gf, {"identity": ident, "shard_size": shard})
            p_t, p_h, p_rec = state_files(state, "prefix")
            if p_rec.is_file():
                rec = read_json(p_rec, "Ray fit checkpoint")
                acc_t = GramAccumulator.load(p_t, device=device)
                acc_h = GramAccumulator.load(p_h, device=device)
                merged, skipped = int(rec["samples"]), list(rec["skipped"])
        bar.start("fit", total=n, done=merged)
        shards = grid(merged, n, shard)
        results: dict[tuple[int, int], dict[str, Any]] = {}
        todo = []
        for a, b in shards:
            if state is not None and state_files(state, shard_name(a, b))[2].is_file():
                results[(a, b)] = read_json(state_files(state, shard_name(a, b))[2], "shard")
                bar.advance(b - a)
            else:
                todo.append((a, b))
        order = deque(shards)

        def merge() -> None:
            nonlocal merged
            while order and order[0] in results:
                a, b = order.popleft()
                rec = results.pop((a, b))
                if state is None:
                    part_t = GramAccumulator.from_state(dim, rec["train"], device)
                    part_h = GramAccumulator.from_state(dim, rec["holdout"], device)
                else:
                    f_t, f_h, f_rec = state_files(state, shard_name(a, b))
                    part_t = GramAccumulator.load(f_t, device=device)
                    part_h = GramAccumulator.load(f_h, device=device)
                acc_t.merge(part_t)
                acc_h.merge(part_h)
                skipped.extend(rec["skipped"])
                merged = b
                if state is not None:  # the prefix first, then drop the merged shard
                    p_t, p_h, p_rec = state_files(state, "prefix")
                    acc_t.save(p_t)
                    acc_h.save(p_h)
                    write_json_atomic(p_rec, {"samples": b, "skipped": skipped})
                    for f in (f_rec, f_t, f_h):
                        f.unlink(missing_ok=True)

        def done(task: tuple[int, int], rec: dict[str, Any]) -> None:
            results[task] = rec
            bar.advance(task[1] - task[0])
            merge()

        merge()
        if todo:
            args = (names, images, {m.name: m.onnx_sha256 for m in rows.networks},
                    self.ray.put(list(rows.data.samples)))
            folder_s = str(state) if state is not None else None
            self._run(todo, args,
                      lambda actor, t: actor.fit_shard.remote(t[0], t[1], bs, mask[t[0]:t[1]],
                                                              device, folder_s),
                      done, lambda t: f"images {t[0]}–{t[1]}", bar)
        merge()
        if order:
            raise InternalError(f"{len(order)} Gram shards were never merged")
        bar.done()
        return Accumulated(acc_t, acc_h, model_slices(names, dims), n, {"skipped": skipped})

    # -- evaluate ---------------------------------------------------------------------------
    def evaluate_sources(self, store: Any, maps: Any, chosen: Sequence[str], device: str,
                         progress: Progress | None) -> list[Any]:
        """One compiled pass per source on the workers; results in ``chosen`` order."""
        bar = or_silent(progress)
        path = getattr(store, "path", None)
        if path is None or not (Path(path) / "manifest.json").is_file():
            raise AffeqError("--executor ray evaluates a feature store on disk",
                             "pass the store's folder, or drop --executor ray")
        maps_arg: Any = maps.path if maps.path and Path(maps.path).is_file() else \
            self.ray.put(maps)
        out: dict[str, Any] = {}

        def done(src: str, res: Any) -> None:
            out[src] = res
            bar.advance(1)

        self._run(list(chosen), ([], None, {}, None),
                  lambda actor, src: actor.evaluate_source.remote(str(path), maps_arg, src,
                                                                  list(chosen), device),
                  done, lambda src: src, bar)
        return [out[src] for src in chosen]


def executor_for(name: str, address: str | None = None, workers: int = 2,
                 gpus_per_worker: float = 0.0, shard_size: int | None = None
                 ) -> RayExecutor | None:
    """The executor a command-line choice names: None for ``local``, else a :class:`RayExecutor`."""
    key = name.strip().lower()
    if key not in EXECUTORS:
        raise AffeqError(f"unknown executor {name!r}", f"use one of {', '.join(EXECUTORS)}")
    if key == "local":
        return None
    return RayExecutor(address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                       shard_size=shard_size)


