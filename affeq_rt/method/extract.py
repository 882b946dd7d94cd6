"""Decode-once feature extraction: each image decoded once, fed to every network, rows to a store.

:func:`extract` writes a resumable :class:`~affeq_rt.io.store.FeatureStore` with one pass of the
engine (``engine.run_pass``) over the images (``method.rows.ImageSource``), feeding one reducer,
:class:`StoreWriterReducer`, that writes the rows through the store's ``StoreWriter``. The store is
its own checkpoint: a rerun resumes at its committed sample. The building blocks (networks,
batches, :class:`ImageOptions`) live in ``method.images`` and are re-exported here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import resolve_pipeline
from affeq_rt.data.readers import DataSource, check_max_images
from affeq_rt.engine import Chunk, Executor, LocalExecutor, run_pass
from affeq_rt.engine.reducer import State
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import load_head
from affeq_rt.io.store import DTYPES as STORE_DTYPES
from affeq_rt.io.store import StoreConfig, StoreWriter
from affeq_rt.method.images import (
    ImageOptions,
    Network,
    feature_batches,
    load_data,
    network_spec,
    open_networks,
    parse_models,
    run_network,
    spec_dict,
)
from affeq_rt.method.rows import ImageSource
from affeq_rt.method.stages import StageSource
from affeq_rt.progress import Progress

__all__ = ["EXTRACT_SHARD", "ExtractOptions", "ExtractResult", "ImageOptions", "Network",
           "StoreWriterReducer", "check_image_options", "check_labels", "extract",
           "feature_batches", "load_data", "open_networks", "parse_models", "run_network",
           "spec_dict"]

EXTRACT_SHARD = 1024  # images per shard on a cluster executor (rounded up to the batch grid)


@dataclass
class ExtractResult:
    """What :func:`extract` did."""

    path: Path
    models: list[str]
    n: int
    skipped: list[dict[str, Any]]
    seconds: float
    images_per_s: float
    resumed_from: int
    already_complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """Human summary lines."""
        if self.already_complete:
            return (f"store {self.path} is already complete: {self.n} images × "
                    f"{len(self.models)} models")
        lines = [f"wrote {self.path}: {self.n} images × {len(self.models)} models "
                 f"({', '.join(self.models)}) in {self.seconds:.1f}s, "
                 f"{self.images_per_s:.1f} img/s"]
        if self.resumed_from:
            lines.append(f"resumed from image {self.resumed_from}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s) (see manifest.json), "
                         f"e.g. {self.skipped[0]['path']}: {self.skipped[0]['reason']}")
        return "\n".join(lines)



class StoreWriterReducer:
    """The rows of a feature store, in sample order, as a reducer of the pass engine.

    In place (``writer`` given) each chunk's readable rows go through ``writer.write`` at the
    next free row; :attr:`rows` counts them (from the writer's committed rows on) and
    :meth:`take_skipped` hands over the unreadable samples not yet committed. :meth:`fresh` is a
    collector for a worker's shard: the rows in memory (float32, as the networks returned them;
    converted to the store's dtype, and checked, only when written) and its skipped samples.
    Merging one writes its rows through the writer, so the store's bytes do not depend on how the
    rows arrived. ``dims``: each model's feature width, in the store's model order.
    """

    def __init__(self, dims: Mapping[str, int], writer: StoreWriter | None = None) -> None:
        self.dims = {m: int(d) for m, d in dims.items()}
        self.writer = writer
        self.rows = int(writer.rows) if writer is not None else 0
        self.skipped: list[dict[str, Any]] = []
        self.parts: dict[str, list[np.ndarray]] = {m: [] for m in self.dims}

    def fresh(self) -> StoreWriterReducer:
        """An empty collector of the same models."""
        return StoreWriterReducer(self.dims)

    def __getstate__(self) -> dict[str, Any]:
        """A collector pickles as itself; the writer (open arrays, the store's lock) never
        leaves this process."""
        if self.writer is not None:
            raise InternalError("only a collector StoreWriterReducer travels to a worker")
        return dict(self.__dict__)

    def _add(self, columns: Mapping[str, np.ndarray], skipped: Sequence[dict[str, Any]]) -> None:
        counts = {int(np.shape(columns[m])[0]) for m in self.dims}
        if len(counts) != 1:
            raise InternalError(f"rows of one chunk differ in count between models: {counts}")
        for m in self.dims:
            if self.writer is not None:
                self.writer.write(m, self.rows, columns[m])
            else:
                self.parts[m].append(np.array(columns[m], np.float32))
        self.rows += counts.pop()
        self.skipped += skipped

    def update(self, chunk: Chunk) -> None:
        """Write (or keep) the chunk's readable rows; note its unreadable samples."""
        self._add(chunk.columns, chunk.skipped)

    def merge(self, other: StoreWriterReducer) -> None:
        """Write (or keep) the rows of the following shard's collector."""
        self._add(other.columns(), other.skipped)

    def columns(self) -> dict[str, np.ndarray]:
        """A collector's rows per model, float32 ``[rows, d]``."""
        if self.writer is not None:
            raise InternalError("the rows of a store being written are in the store")
        return {m: (np.concatenate(p) if p else np.zeros((0, self.dims[m]), np.float32))
                for m, p in self.parts.items()}

    def take_skipped(self) -> list[dict[str, Any]]:
        """The unreadable samples noted since the last call (what the next commit records)."""
        out, self.skipped = self.skipped, []
        return out

    def state(self) -> State:
        """A collector's rows (``features.<model>``), row count and skipped samples. (The store
        being written is its own checkpoint: it has no state.)"""
        return {"rows": self.rows, "skipped": list(self.skipped),
                **{f"features.{m}": x for m, x in self.columns().items()}}

    def load(self, st: State) -> None:
        """Restore :meth:`state` into a fresh collector."""
        self.rows, self.skipped = int(st["rows"]), list(st["skipped"])
        for m, d in self.dims.items():
            x = np.asarray(st[f"features.{m}"], np.float32)
            if x.shape != (self.rows, d):
                raise InternalError(f"a state of {self.rows} rows holds {m} rows {x.shape}")
            self.parts[m] = [x]


class StoreCommits:
    """The store as its own checkpoint (``engine.run.Checkpoint``): the pass starts at its
    committed sample and commits its rows at most every ``seconds`` (and at the end). Clock-timed
    commits are safe here: what is saved is the rows themselves, never a buffered sum."""

    def __init__(self, store: StoreWriterReducer, seconds: float) -> None:
        if store.writer is None:
            raise InternalError("StoreCommits needs the reducer that writes the store")
        self.store, self.seconds = store, float(seconds)
        self.done, self.shard = store.writer.samples_done, None
        self._last = time.perf_counter()

    def restore(self, reducers: Mapping[str, Any]) -> None:
        """Nothing to load: the writer already stands at the committed rows."""

    def due(self, last: int, stop: int, n: int) -> bool:  # noqa: ARG002 - the protocol
        """Every ``seconds`` of wall clock, and at the end."""
        return time.perf_counter() - self._last >= self.seconds or stop == n

    def save(self, reducers: Mapping[str, Any], done: int,  # noqa: ARG002 - the protocol
             shard: int) -> None:  # noqa: ARG002
        """Commit the rows written so far and the samples found unreadable."""
        self.store.writer.commit(done, self.store.rows, self.store.take_skipped())
        self._last = time.perf_counter()


def check_image_options(opt: ImageOptions, dtype: str | None = None,
                        max_images: int | None = None) -> None:
    """AffeqError for a setting no run can use, before any export, decoding or file is made."""
    if int(opt.batch_size) < 1:
        raise AffeqError(f"batch size must be positive, got {opt.batch_size}",
                         "pass --batch-size ≥ 1")
    if opt.workers is not None and int(opt.workers) < 0:
        raise AffeqError(f"--workers must be 0 or more, got {opt.workers}",
                         "pass --workers 0 to decode in this process")
    resolve_pipeline(opt.pipeline)  # AffeqError naming the choices
    check_max_images(max_images)
    if dtype is not None and dtype not in STORE_DTYPES:
        raise AffeqError(f"unknown dtype {dtype!r}", f"use one of {', '.join(STORE_DTYPES)}")


def check_labels(src: DataSource, classes: int) -> None:
    """AffeqError naming the samples whose label is not one of ``classes`` (all or nothing: a
    store never holds a label some network cannot predict). -1 means unlabelled."""
    bad = [s for s in src.samples if s.label < -1 or s.label >= classes]
    if bad:
        raise AffeqError(f"{len(bad)} label(s) are outside the networks' classes 0..{classes - 1} "
                         f"(first: {bad[0].path} labelled {bad[0].label})",
                         "fix the label file: labels are class indices of the networks' heads")


def _open_writer(rows: ImageSource, out: str | os.PathLike, dtype: str) -> StoreWriter:
    """The store's writer (created, or reopened to resume), described from ``rows``."""
    src, nets = rows.data, rows.networks
    if isinstance(rows, StageSource):  # every network's stages, then the network
        heads, dims, specs, exports = rows.head_files(), rows.dims(), rows.specs(), rows.exports()
    else:
        heads = {n.name: load_head(n.head_path) for n in nets}
        dims, specs = {n.name: n.dim for n in nets}, {n.name: spec_dict(n.spec) for n in nets}
        exports = {n.name: n.onnx_sha256 for n in nets}
    cfg = StoreConfig(models=rows.names, dims=dims, specs=specs, exports=exports,
                      data=src.describe(), dtype=dtype, batch_size=rows.options.batch_size,
                      pipeline=rows.pipeline)
    return StoreWriter(out, cfg, heads)


def _finish(writer: StoreWriter, store: StoreWriterReducer, rows: ImageSource,
            run: dict[str, Any]) -> None:
    """Commit the tail, refuse a store without rows, and finalise with the run's record."""
    src = rows.data
    if writer.samples_done != len(src):  # empty tail (start == len) or nothing to do
        writer.commit(len(src), store.rows, store.take_skipped())
    if writer.rows == 0:
        first = writer.skipped[0] if writer.skipped else {"path": "?", "reason": "?"}
        writer.discard()  # no rows: no state worth resuming; the corrected command starts over
        raise AffeqError(f"none of the {len(src)} images could be read (e.g. {first['path']}: "
                         f"{first['reason']})", "check --data")
    writer.finalise(src.samples, {"run": run})


@dataclass(frozen=True)
class ExtractOptions:
    """The knobs of an extraction, as ``FitOptions`` are a fit's (image reading has its own:
    :class:`ImageOptions`)."""

    dtype: str = "float16"  # the store's row type: float16 | float32
    max_images: int | None = None  # only the first N images
    stages: bool = False  # every network's pooled stages too (NAME@s1 … then NAME)
    commit_every: float = 5.0  # seconds between commits of the rows (always at a shard boundary)
    executor: Executor = field(default_factory=LocalExecutor)  # where the pass runs


def extract(models: str | Sequence[str], data: str | os.PathLike | DataSource,
            out: str | os.PathLike, *, options: ExtractOptions | None = None,
            images: ImageOptions | None = None, progress: Progress | None = None
            ) -> ExtractResult:
    """Run every model over the images and write (or finish) a feature store at ``out``.

    ``options.stages``: store every network's pooled stages too (``NAME@s1`` … then ``NAME``,
    from its ``stages.onnx``: ``method.stages.StageSource``), still one decode per image.

    Rows are committed at most every ``options.commit_every`` seconds (and at the end), always at
    a shard boundary of the sample grid, so a rerun after any interruption redoes the same batches
    and writes the same bytes. ``progress`` counts images (resumed ones included in ``done``).
    ``options.executor`` (``LocalExecutor``: one shard per batch) runs the networks elsewhere,
    e.g. on a Ray cluster (``affeq_rt.cluster.RayExecutor``, shards of its ``shard_size`` or
    :data:`EXTRACT_SHARD` images); its shards are written through the same writer in shard order,
    so the store is byte-identical.
    """
    o = options or ExtractOptions()
    opt = images or ImageOptions()
    check_image_options(opt, o.dtype, o.max_images)
    if Path(out).exists() and not Path(out).is_dir():
        raise AffeqError(f"--out {out} is a file, not a feature store folder",
                         "choose a new folder for --out")
    rows = (StageSource if o.stages else ImageSource)(data, models, opt, o.max_images)
    check_labels(rows.data, min(s.num_classes - s.label_offset
                                for s in map(network_spec, parse_models(models))))
    writer = _open_writer(rows, out, o.dtype)
    if writer.already_complete:
        return ExtractResult(Path(out), rows.names, writer.rows, writer.skipped, 0.0, 0.0, 0, True)
    bs = writer.cfg.batch_size  # a resumed store keeps its batch grid
    # the pipeline is pinned to the driver's concrete one, so a cluster worker never re-resolves
    # ``fast`` for its own hardware (nvjpeg where it does not load is one line there, not rows
    # from another pipeline)
    rows.options = replace(opt, batch_size=bs, pipeline=rows.pipeline)
    start = writer.samples_done
    store = StoreWriterReducer({m: writer.cfg.dims[m] for m in rows.names}, writer)
    ex = o.executor
    t0 = time.perf_counter()
    run_pass(rows, {"store": store}, executor=ex, checkpoint=StoreCommits(store, o.commit_every),
             shard=ex.shard_size or (bs if isinstance(ex, LocalExecutor) else EXTRACT_SHARD),
             progress=progress, task="extract")
    seconds = time.perf_counter() - t0
    rate = (len(rows.data) - start) / seconds if seconds > 0 else 0.0  # this run's images only
    _finish(writer, store, rows, {"seconds": seconds, "images_per_s": rate, "batch_size": bs,
                                  "workers": opt.workers, "provider": opt.provider})
    return ExtractResult(Path(out), rows.names, writer.rows, writer.skipped, seconds, rate, start)
