"""The decode-once loader: each image is decoded once and prepared for every distinct preprocessing.

One tensor per :class:`~affeq_rt.registry.spec.Preprocessing` (``preprocess_key``), in fixed
batches of sample indices so that a resumed run sees exactly the same batches as an uninterrupted
one. Unreadable files are skipped and reported, never fatal.

Decode processes (issue 25) write uint8 crops straight into shared-memory slots and return only
which samples were readable; the consumer normalises each batch once, vectorised
(``normalize_batch``). Every worker count runs the same per-image code and the same normalisation,
so the tensors (and the stores written from them) are byte-identical for a fixed pipeline.
The ``nvjpeg`` pipeline (``data.gpu_decode``) decodes on a CUDA GPU in this process instead, one
batched call per batch, and hands the same uint8 crops to the same normalisation.

The decode processes are the loader's own (:class:`_Decoders`, issue 23), not a
``multiprocessing.Pool``: they run in a session of their own, so a stop signal sent to the
command's process group reaches only the loader, which kills them; one pipe each, no shared lock
a dying process could leave taken; slots are anonymous memory files, so nothing is left in
/dev/shm whatever is killed.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from affeq_rt.data import gpu_decode
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


@dataclass
class Batch:
    """One batch of consecutive samples ``[start, stop)``: one tensor per preprocessing key
    (rows = readable samples only, in order), which samples were readable, why others were not."""

    start: int
    stop: int
    tensors: dict[Preprocessing, np.ndarray]
    ok: np.ndarray  # bool [stop-start]
    skipped: list[tuple[int, str, str]]  # (sample index, path, reason)


def _worker_init(pipeline: str) -> None:
    """In a decode process: with the torchvision pipeline, torch on one thread (the processes are
    the parallelism; torch's own pool would oversubscribe the cores)."""
    if pipeline == "torchvision":
        tv = _torchvision()
        if tv is not None:
            tv[0].set_num_threads(1)


#: What a decode process runs: the loader's ``sys.path`` (the first message, before anything of
#: affeq_rt is imported), then :func:`_work`. An EOF first (the loader stopped while this one
#: started) is a quiet exit.
_BOOT = """\
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
try:
    sys.path[:] = conn.recv()
except (EOFError, OSError):
    raise SystemExit(0)
from affeq_rt.data.loader import _work
_work(conn)
"""


def _signal_name(code: int | None) -> str:
    """How a decode process ended, from its return code."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Decoders:
    """``n`` decode processes in a session of their own, one pipe each, stopped only by the loader.

    A stop signal to the loader's process group (a terminal's Ctrl-C, a closed terminal's SIGHUP,
    ``kill -TERM -PGID`` from a service manager) never reaches them, and they share no lock with
    the loader that a signal could leave taken (issue 23: ``multiprocessing.Pool`` workers died of
    a group SIGTERM holding the task queue's lock, and ``Pool.terminate`` then waited for that lock
    forever). Nothing in the loader's signal handling changes while they start, so a stop signal
    then is neither lost nor a traceback: it stops the loader, which kills what it started. The
    loader kills them when it stops, finished or not; if it dies, each exits at its pipe's EOF.
    """

    def __init__(self, n: int, init: tuple[Any, ...], fds: Sequence[int]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        try:
            for _ in range(n):
                mine, theirs = mp.Pipe()
                self.conns.append(mine)
                try:
                    fd = theirs.fileno()
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-c", _BOOT, str(fd)], pass_fds=(fd, *fds),
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        start_new_session=True))
                finally:
                    theirs.close()
                mine.send(list(sys.path))
                mine.send(init)
        except BaseException:
            self.stop()
            raise

    def send(self, w: int, task: tuple[int, list[str], int]) -> None:
        """Queue ``task`` (batch start, its paths, its slot) for process ``w``."""
        try:
            self.conns[w].send(task)
        except OSError:
            raise self._died(w, task[0], len(task[1])) from None

    def answers(self, busy: dict[int, deque[tuple[int, int]]]) -> list[tuple[int, tuple]]:
        """Wait until a busy process answers: (process, (start, ok, skipped, slot)) for each that
        did. ``busy`` maps a process to its batches' (start, size), oldest first."""
        ready = wait([self.conns[w] for w, q in busy.items() if q])
        out = []
        for w, q in busy.items():
            if self.conns[w] not in ready:
                continue
            try:
                res = self.conns[w].recv()
            except (EOFError, OSError):
                raise self._died(w, *q[0]) from None
            if isinstance(res[0], str):
                raise InternalError(f"a decode process failed:\n{res[1]}")
            out.append((w, res))
        return out

    def _died(self, w: int, start: int, size: int) -> AffeqError:
        """The error for process ``w`` gone while it decoded images [start, start+size)."""
        try:
            code: int | None = self.procs[w].wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return AffeqError(f"a decode process (pid {self.procs[w].pid}) {_signal_name(code)} "
                          f"while decoding images {start + 1}-{start + size}",
                          "if the machine ran out of memory, pass a smaller --workers or "
                          "--batch-size; rerun the same command to resume")

    def stop(self) -> None:
        """Close every pipe, kill every process (a batch in flight is not waited for; they hold
        nothing to save) and reap them. A second signal meanwhile leaves none behind: each
        exits at its pipe's EOF."""
        for c in self.conns:
            c.close()
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(OSError):
                    p.kill()
        for p in self.procs:
            p.wait()

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
          views: Sequence[np.ndarray], ready: dict[int, list[np.ndarray]] | None = None
          ) -> tuple[list[bool], list[tuple[int, str, str]]]:
    """Decode each path once and write its crops, readable samples packed in order, into
    ``views``; (readable flags, skipped samples). ``ready``: crops already made (the GPU's, by
    position in ``paths``); the others by ``prepare_crops``. Bad files never raise."""
    ok: list[bool] = []
    skipped: list[tuple[int, str, str]] = []
    row = 0
    for j, path in enumerate(paths):
        try:
            crops = ready[j] if ready and j in ready else prepare_crops(path, keys, pipeline)
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


def _slot(size: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared memory file of ``size`` bytes and its mapping. It has no name, so
    nothing is left behind whatever kills the processes holding it (the kernel frees it with the
    last one)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("affeq-rt-slot")  # close-on-exec; passed to the decoders by number
    else:
        with tempfile.TemporaryFile() as f:  # removed from its folder at once
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def _work(conn: Connection) -> None:
    """A decode process: map the slots, then fill one batch per task until the pipe closes.
    Only the readable flags, the skipped samples and the slot travel back."""
    try:
        pipeline, keys, rows, size, fds = conn.recv()
        _worker_init(pipeline)
        views = [_slot_views(mmap.mmap(fd, size), keys, rows) for fd in fds]
        while True:
            start, paths, slot = conn.recv()
            ok, skipped = _fill(start, paths, keys, pipeline, views[slot])
            conn.send((start, ok, skipped, slot))
    except (EOFError, OSError):
        return  # the loader closed the pipe (finished, stopped or gone): nothing to report
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc()))

def distinct_specs(specs: Sequence[BackboneSpec | Preprocessing]) -> list[Preprocessing]:
    """One :class:`Preprocessing` per distinct ``preprocess_key``, in first-seen order."""
    return list(dict.fromkeys(preprocess_key(s) for s in specs))


def iter_batches(samples: Sequence[Sample], specs: Sequence[BackboneSpec | Preprocessing],
                 batch_size: int = 32, workers: int | None = None, start: int = 0,
                 prefetch: int | None = None, pipeline: str = DEFAULT_PIPELINE,
                 device: str | None = None) -> Iterator[Batch]:
    """Yield batches of samples ``[b*batch_size, (b+1)*batch_size)`` from ``start`` (a multiple of
    ``batch_size``), each image decoded once and preprocessed once per distinct spec.

    ``workers`` > 0 uses that many decode processes, each writing uint8 crops into one of
    ``prefetch`` shared-memory slots (default 2·workers) so memory stays flat on 1.28M images; 0
    decodes in this process; None picks :func:`default_workers`. ``pipeline`` is how files are
    decoded and resized (``preprocess.PIPELINES``; ``exact`` reproduces timm's eval transform),
    resolved for ``device``, where the networks run (None: the CPU; ``cuda``: ``fast`` is
    ``nvjpeg`` where it loads). ``nvjpeg`` decodes in this process whatever ``workers`` says.
    Stop signals to the process group never reach the decode processes; when the consumer stops
    (a signal, an error, ``close()``) they are killed at once, without waiting for the batches in
    flight. One that dies on its own (the OOM killer) is a one-line error naming its images.
    """
    if batch_size <= 0:
        raise AffeqError(f"batch size must be positive, got {batch_size}", "pass --batch-size ≥ 1")
    if start % batch_size:
        raise InternalError(f"start {start} is not a multiple of batch_size {batch_size}")
    concrete = resolve_pipeline(pipeline, device)
    keys = distinct_specs(specs)
    paths = [s.path for s in samples]
    n_workers = default_workers() if workers is None else workers
    grid = range(start, len(paths), batch_size)

    def to_batch(b: int, ok: list[bool], skipped: list, views: Sequence[np.ndarray]) -> Batch:
        rows = sum(ok)
        tensors = {k: normalize_batch(v[:rows], k) for k, v in zip(keys, views, strict=True)}
        return Batch(b, min(b + batch_size, len(paths)), tensors, np.asarray(ok, bool), skipped)

    if n_workers <= 0 or concrete == "nvjpeg":
        views = _slot_views(bytearray(slot_bytes(keys, batch_size)), keys, batch_size)
        gpu = gpu_decode.decode_device(device)
        for b in grid:
            part = paths[b:b + batch_size]
            ready = gpu_decode.decode_crops(part, keys, gpu) if concrete == "nvjpeg" else None
            ok, skipped = _fill(b, part, keys, concrete, views, ready)
            yield to_batch(b, ok, skipped, views)
        return
    yield from _pooled(paths, keys, concrete, batch_size, grid, n_workers,
                       prefetch or 2 * n_workers, to_batch)


def _pooled(paths: list[str], keys: list[Preprocessing], pipeline: str, batch_size: int,
            grid: range, workers: int, depth: int, to_batch: Any) -> Iterator[Batch]:
    """:func:`iter_batches` with ``workers`` decode processes and ``depth`` shared slots: while a
    slot is free, the next batch goes to the least busy process (at most ``depth/workers`` queued
    each, so they keep decoding while the consumer works); batches are yielded in order."""
    size = max(slot_bytes(keys, batch_size), 1)
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    views: list[list[np.ndarray]] = []  # numpy views pin the mappings: cleared before close()
    decoders = None
    try:
        for _ in range(depth):
            fd, m = _slot(size)
            fds.append(fd)
            maps.append(m)
            views.append(_slot_views(m, keys, batch_size))
        decoders = _Decoders(workers, (pipeline, keys, batch_size, size, fds), fds)
        free = deque(range(depth))
        per_process = -(-depth // workers)
        busy: dict[int, deque[tuple[int, int]]] = {w: deque() for w in range(workers)}
        done: dict[int, tuple[list[bool], list, int]] = {}  # batch start -> its answer
        order: deque[int] = deque()  # batches handed out, in grid order
        todo = iter(grid)
        nxt = next(todo, None)
        while nxt is not None or order:
            while nxt is not None and free:
                w = min(busy, key=lambda k: len(busy[k]))
                if len(busy[w]) >= per_process:
                    break
                slot = free.popleft()
                task = (nxt, paths[nxt:nxt + batch_size], slot)
                busy[w].append((nxt, len(task[1])))
                decoders.send(w, task)
                order.append(nxt)
                nxt = next(todo, None)
            if order[0] in done:
                b = order.popleft()
                ok, skipped, slot = done.pop(b)
                batch = to_batch(b, ok, skipped, views[slot])  # copies out: the slot is free
                free.append(slot)
                yield batch
                continue
            for w, (b, ok, skipped, slot) in decoders.answers(busy):
                busy[w].popleft()
                done[b] = (ok, skipped, slot)
    finally:
        if decoders is not None:
            decoders.stop()
        views.clear()
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)
