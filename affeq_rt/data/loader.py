"""The decode-once loader: each image is decoded once and prepared for every distinct preprocessing.

One tensor per :class:`~affeq_rt.registry.spec.Preprocessing` (``preprocess_key``), in fixed
batches of sample indices so that a resumed run sees exactly the same batches as an uninterrupted
one. Unreadable files are skipped and reported, never fatal.

Worker processes (issue 25) write uint8 crops straight into shared-memory slots and return only
which samples were readable; the consumer normalises each batch once, vectorised
(``normalize_batch``). Every worker count runs the same per-image code and the same normalisation,
so the tensors (and the stores written from them) are byte-identical for a fixed pipeline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import (
    DEFAULT_PIPELINE,
    _torchvision,
    normalize_batch,
    prepare_crops,
    preprocess_key,
    resolve_pipeline,
)
from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.registry.spec import BackboneSpec, Preprocessing

#: Usable CPUs at or below which ``workers=None`` decodes in the consuming process: there the
#: networks already use every core, and decode processes only took CPU from them (issue 25: on
#: 2 cores the default 2 workers made ``extract`` 1.27× slower than in-process).
MIN_CPUS_FOR_WORKERS = 4
#: Most decode processes ``workers=None`` starts (more rarely pay: one consumer normalises).
MAX_AUTO_WORKERS = 8
#: Shared-memory slots are named ``<prefix><pid>_<random>`` (/dev/shm on Linux).
SLOT_PREFIX = "affeq_"


@dataclass
class Batch:
    """One batch of consecutive samples ``[start, stop)``: one tensor per preprocessing key
    (rows = readable samples only, in order), which samples were readable, why others were not."""

    start: int
    stop: int
    tensors: dict[Preprocessing, np.ndarray]
    ok: np.ndarray  # bool [stop-start]
    skipped: list[tuple[int, str, str]]  # (sample index, path, reason)


def _ignore_sigint() -> None:
    """Ctrl-C reaches the whole process group; only the main process acts on it (a worker dying of
    it mid-task lost its batch and left the main process waiting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_init(pipeline: str) -> None:
    """Worker initializer: SIGINT ignored; with the torchvision pipeline, torch on one thread (the
    workers are the parallelism; torch's own pool would oversubscribe the cores)."""
    _ignore_sigint()
    if pipeline == "torchvision":
        tv = _torchvision()
        if tv is not None:
            tv[0].set_num_threads(1)


def _start_pool(ctx: Any, workers: int, pipeline: str = "exact") -> Any:
    """A spawn pool whose workers never see Ctrl-C, not even while they start up.

    A Ctrl-C reaches the whole process group. A blocked mask is not enough (the spawned
    interpreter got SIGINT while it re-imported the CLI and printed a KeyboardInterrupt
    traceback), but an *ignored* SIGINT survives exec and Python then installs no handler of its
    own: so SIGINT is ignored here for the few milliseconds the pool takes to start. A Ctrl-C
    already pending is delivered first (the pool is not started); one that arrives during the start
    itself is lost (press it again). Outside the main thread (signal dispositions are the main
    thread's) the workers rely on :func:`_worker_init` alone.
    """
    def start() -> Any:
        return ctx.Pool(workers, initializer=_worker_init, initargs=(pipeline,))

    if threading.current_thread() is not threading.main_thread():
        return start()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pool = None
    try:
        if signal.SIGINT not in signal.sigpending():
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                pool = start()
            finally:
                signal.signal(signal.SIGINT, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending Ctrl-C is delivered here
    if pool is None:
        raise KeyboardInterrupt
    return pool


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None) -> int:
    """Decode processes for ``workers=None``: none up to ``MIN_CPUS_FOR_WORKERS`` usable CPUs
    (in-process is never slower there), else half the CPUs (the other half runs the networks and
    the consumer's normalisation), at most ``MAX_AUTO_WORKERS``."""
    n = usable_cpus() if cpus is None else cpus
    return 0 if n <= MIN_CPUS_FOR_WORKERS else min(n // 2, MAX_AUTO_WORKERS)


def _slot_views(buf: Any, keys: Sequence[Preprocessing], rows: int) -> list[np.ndarray]:
    """uint8 [rows, S, S, 3] views, one per key, laid out one after another in ``buf``."""
    views, offset = [], 0
    for k in keys:
        shape = (rows, k.input_size, k.input_size, 3)
        views.append(np.ndarray(shape, np.uint8, buffer=buf, offset=offset))
        offset += int(np.prod(shape))
    return views


def slot_bytes(keys: Sequence[Preprocessing], rows: int) -> int:
    """Bytes of one batch of uint8 crops for ``keys``."""
    return sum(rows * k.input_size * k.input_size * 3 for k in keys)


def _fill(start: int, paths: Sequence[str], keys: Sequence[Preprocessing], pipeline: str,
          views: Sequence[np.ndarray]) -> tuple[list[bool], list[tuple[int, str, str]]]:
    """Decode each path once and write its crops, readable samples packed in order, into
    ``views``; (readable flags, skipped samples). Bad files never raise."""
    ok: list[bool] = []
    skipped: list[tuple[int, str, str]] = []
    row = 0
    for j, path in enumerate(paths):
        try:
            crops = prepare_crops(path, keys, pipeline)
        except AffeqError as e:
            ok.append(False)
            skipped.append((start + j, path, e.problem))
            continue
        except Exception as e:  # a decoder bug on one odd file must not kill a long run
            ok.append(False)
            skipped.append((start + j, path, f"{e.__class__.__name__}: {e}"))
            continue
        for v, c in zip(views, crops, strict=True):
            v[row] = c
        ok.append(True)
        row += 1
    return ok, skipped


def _slot_name() -> str:
    """A fresh shared-memory name that says whose it is (≤ 31 characters, macOS's limit)."""
    return f"{SLOT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"


def clean_stale_slots(folder: str = "/dev/shm") -> list[str]:
    """Unlink the slots of loaders whose process is gone (Linux keeps POSIX shared memory in
    ``folder``); the names removed. A loader unlinks its own slots when it stops, and the resource
    tracker does when the loader is killed; only a kill of both (a whole process group, say)
    leaves them, and the next loader removes them here."""
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(SLOT_PREFIX)]
    except OSError:
        return removed  # no /dev/shm (macOS, Windows): nothing to look at
    for name in names:
        pid = name[len(SLOT_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): its slots are in use
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass  # gone meanwhile, or not ours to remove
    return removed


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}  # a worker's open slots, by name


def _prepare(args: tuple[int, list[str], list[Preprocessing], str, str, int, int]
             ) -> tuple[int, list[bool], list[tuple[int, str, str]], int]:
    """Worker: fill shared-memory slot ``name`` (laid out for ``rows`` samples per key, like the
    consumer's views) with one batch's uint8 crops; only the flags, the skipped samples and the
    slot travel back."""
    start, paths, keys, pipeline, name, slot, rows = args
    shm = _ATTACHED.get(name)
    if shm is None:
        shm = _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    ok, skipped = _fill(start, paths, keys, pipeline, _slot_views(shm.buf, keys, rows))
    return start, ok, skipped, slot


def distinct_specs(specs: Sequence[BackboneSpec | Preprocessing]) -> list[Preprocessing]:
    """One :class:`Preprocessing` per distinct ``preprocess_key``, in first-seen order."""
    return list(dict.fromkeys(preprocess_key(s) for s in specs))


def iter_batches(samples: Sequence[Sample], specs: Sequence[BackboneSpec | Preprocessing],
                 batch_size: int = 32, workers: int | None = None, start: int = 0,
                 prefetch: int | None = None,
                 pipeline: str = DEFAULT_PIPELINE) -> Iterator[Batch]:
    """Yield batches of samples ``[b*batch_size, (b+1)*batch_size)`` from ``start`` (a multiple of
    ``batch_size``), each image decoded once and preprocessed once per distinct spec.

    ``workers`` > 0 uses that many spawned processes, each writing uint8 crops into one of
    ``prefetch`` shared-memory slots (default 2·workers) so memory stays flat on 1.28M images; 0
    decodes in this process; None picks :func:`default_workers`. ``pipeline`` is how files are
    decoded and resized (``preprocess.PIPELINES``; ``exact`` reproduces timm's eval transform).
    Workers ignore SIGINT; when the consumer stops (Ctrl-C, an error, ``close()``) the pool is
    terminated at once, without waiting for the batches in flight.
    """
    if batch_size <= 0:
        raise AffeqError(f"batch size must be positive, got {batch_size}", "pass --batch-size ≥ 1")
    if start % batch_size:
        raise InternalError(f"start {start} is not a multiple of batch_size {batch_size}")
    concrete = resolve_pipeline(pipeline)
    keys = distinct_specs(specs)
    paths = [s.path for s in samples]
    n_workers = default_workers() if workers is None else workers
    grid = range(start, len(paths), batch_size)

    def to_batch(b: int, ok: list[bool], skipped: list, views: Sequence[np.ndarray]) -> Batch:
        rows = sum(ok)
        tensors = {k: normalize_batch(v[:rows], k) for k, v in zip(keys, views, strict=True)}
        return Batch(b, min(b + batch_size, len(paths)), tensors, np.asarray(ok, bool), skipped)

    if n_workers <= 0:
        views = _slot_views(bytearray(slot_bytes(keys, batch_size)), keys, batch_size)
        for b in grid:
            ok, skipped = _fill(b, paths[b:b + batch_size], keys, concrete, views)
            yield to_batch(b, ok, skipped, views)
        return
    yield from _pooled(paths, keys, concrete, batch_size, grid, n_workers,
                       prefetch or 2 * n_workers, to_batch)


def _pooled(paths: list[str], keys: list[Preprocessing], pipeline: str, batch_size: int,
            grid: range, workers: int, depth: int, to_batch: Any) -> Iterator[Batch]:
    """:func:`iter_batches` with ``workers`` spawned processes and ``depth`` shared slots."""
    ctx = mp.get_context("spawn")  # never fork a process holding onnxruntime/torch threads
    size = max(slot_bytes(keys, batch_size), 1)
    clean_stale_slots()
    slots: list[shared_memory.SharedMemory] = []
    views: list[list[np.ndarray]] = []  # numpy views pin the buffers: cleared before close()
    pool = None
    try:
        for _ in range(depth):
            slots.append(shared_memory.SharedMemory(_slot_name(), create=True, size=size))
            views.append(_slot_views(slots[-1].buf, keys, batch_size))
        free = deque(range(depth))
        pool = _start_pool(ctx, workers, pipeline)
        pending: deque = deque()

        def collect() -> Batch:
            b, ok, skipped, slot = pending.popleft().get()
            batch = to_batch(b, ok, skipped, views[slot])  # copies out: the slot is free again
            free.append(slot)
            return batch

        for b in grid:
            if not free:
                yield collect()
            slot = free.popleft()
            task = (b, paths[b:b + batch_size], keys, pipeline, slots[slot].name, slot,
                    batch_size)
            pending.append(pool.apply_async(_prepare, (task,)))
        while pending:
            yield collect()
        pool.close()
        pool.join()
    finally:
        if pool is not None:
            pool.terminate()  # a no-op after close/join; otherwise stops the workers now
            pool.join()
        views.clear()
        for m in slots:
            m.close()
            m.unlink()
