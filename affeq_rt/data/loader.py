"""The decode-once loader: each image is decoded once and prepared for every distinct preprocessing.

One tensor per :class:`~affeq_rt.registry.spec.Preprocessing` (``preprocess_key``), in worker
processes, in fixed batches of sample indices so that a resumed run sees exactly the same batches
as an uninterrupted one. Unreadable files are skipped and reported, never fatal.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import load_image, preprocess, preprocess_key
from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.registry.spec import BackboneSpec, Preprocessing


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
    """Worker initializer: Ctrl-C reaches the whole process group; only the main process acts on
    it (a worker dying of it mid-task lost its batch and left the main process waiting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_pool(ctx: Any, workers: int) -> Any:
    """A spawn pool whose workers never see Ctrl-C, not even while they start up.

    A Ctrl-C reaches the whole process group. A blocked mask is not enough (the spawned
    interpreter got SIGINT while it re-imported the CLI and printed a KeyboardInterrupt
    traceback), but an *ignored* SIGINT survives exec and Python then installs no handler of its
    own: so SIGINT is ignored here for the few milliseconds the pool takes to start. A Ctrl-C
    already pending is delivered first (the pool is not started); one that arrives during the start
    itself is lost (press it again). Outside the main thread (signal dispositions are the main
    thread's) the workers rely on :func:`_ignore_sigint` alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return ctx.Pool(workers, initializer=_ignore_sigint)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pool = None
    try:
        if signal.SIGINT not in signal.sigpending():
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                pool = ctx.Pool(workers, initializer=_ignore_sigint)
            finally:
                signal.signal(signal.SIGINT, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending Ctrl-C is delivered here
    if pool is None:
        raise KeyboardInterrupt
    return pool


def _prepare(args: tuple[int, list[str], list[Preprocessing]]) -> tuple[int, dict, list, list]:
    """Worker: decode each path once, preprocess for every distinct spec; bad files never raise."""
    start, paths, keys = args
    outs: dict[Preprocessing, list[np.ndarray]] = {k: [] for k in keys}
    ok: list[bool] = []
    skipped: list[tuple[int, str, str]] = []
    for j, path in enumerate(paths):
        try:
            img = load_image(path)
            arrs = [preprocess(img, k) for k in keys]
        except AffeqError as e:
            ok.append(False)
            skipped.append((start + j, path, e.problem))
            continue
        except Exception as e:  # a decoder bug on one odd file must not kill a long run
            ok.append(False)
            skipped.append((start + j, path, f"{e.__class__.__name__}: {e}"))
            continue
        ok.append(True)
        for k, a in zip(keys, arrs, strict=True):
            outs[k].append(a)
    tensors = {k: (np.stack(v) if v else np.zeros((0, 3, k.input_size, k.input_size), np.float32))
               for k, v in outs.items()}
    return start, tensors, ok, skipped


def distinct_specs(specs: Sequence[BackboneSpec | Preprocessing]) -> list[Preprocessing]:
    """One :class:`Preprocessing` per distinct ``preprocess_key``, in first-seen order."""
    return list(dict.fromkeys(preprocess_key(s) for s in specs))


def iter_batches(samples: Sequence[Sample], specs: Sequence[BackboneSpec | Preprocessing],
                 batch_size: int = 32,
                 workers: int = 2, start: int = 0, prefetch: int | None = None) -> Iterator[Batch]:
    """Yield batches of samples ``[b*batch_size, (b+1)*batch_size)`` from ``start`` (a multiple of
    ``batch_size``), each image decoded once and preprocessed once per distinct spec.

    ``workers`` > 0 uses that many spawned processes with a bounded queue (``prefetch`` batches in
    flight, default 2·workers) so memory stays flat on 1.28M images; 0 decodes in this process.
    Workers ignore SIGINT; when the consumer stops (Ctrl-C, an error, ``close()``) the pool is
    terminated at once, without waiting for the batches in flight.
    """
    if batch_size <= 0:
        raise AffeqError(f"batch size must be positive, got {batch_size}", "pass --batch-size ≥ 1")
    if start % batch_size:
        raise InternalError(f"start {start} is not a multiple of batch_size {batch_size}")
    uspecs = distinct_specs(specs)
    paths = [s.path for s in samples]
    tasks = ((b, paths[b:b + batch_size], uspecs) for b in range(start, len(paths), batch_size))

    def to_batch(res: tuple[int, dict, list, list]) -> Batch:
        b, tensors, ok, skipped = res
        return Batch(b, min(b + batch_size, len(paths)), tensors, np.asarray(ok, bool), skipped)

    if workers <= 0:
        for t in tasks:
            yield to_batch(_prepare(t))
        return
    ctx = mp.get_context("spawn")  # never fork a process holding onnxruntime/torch threads
    depth = prefetch or 2 * workers
    pool = _start_pool(ctx, workers)
    try:
        pending: deque = deque()
        for t in tasks:
            pending.append(pool.apply_async(_prepare, (t,)))
            if len(pending) >= depth:
                yield to_batch(pending.popleft().get())
        while pending:
            yield to_batch(pending.popleft().get())
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # a no-op after close/join; otherwise stops the workers now
