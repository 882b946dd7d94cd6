"""Decode-once feature extraction: each image decoded once, fed to every network, rows to a store.

:func:`open_networks` resolves names, exports (or reuses) each backbone and opens its
``features.onnx``; :func:`feature_batches` streams (batch, features-per-model) from the decode-once
loader; :func:`extract` writes a resumable :class:`~affeq_rt.io.store.FeatureStore`. The image
options (:class:`ImageOptions`) are shared with ``fit``'s image source.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.loader import Batch, iter_batches
from affeq_rt.data.preprocess import preprocess_key
from affeq_rt.data.readers import DataSource, discover
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import sha256_file
from affeq_rt.io.heads import Head, load_head
from affeq_rt.io.store import DTYPES as STORE_DTYPES
from affeq_rt.io.store import StoreConfig, StoreWriter
from affeq_rt.method.executor import Executor
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.progress import Progress, or_silent
from affeq_rt.registry.spec import get_spec


@dataclass(frozen=True)
class ImageOptions:
    """How images are read and run through the networks (``extract`` and ``fit`` on images)."""

    batch_size: int = 32
    workers: int = 2  # decoding processes (0: decode in this process)
    provider: str = "auto"  # onnxruntime provider: auto|tensorrt|cuda|cpu
    random_weights: bool = False  # export with random weights (tests, benchmarks)
    export_root: str | os.PathLike | None = None  # export cache folder (default: the user's)
    labels: str | None = None  # label file of a flat folder
    meta: str | None = None  # devkit meta.mat


@dataclass
class Network:
    """One opened backbone: canonical name, spec, export folder, ORT session, feature width, its
    classifier (background rows stripped) and the export's head file (copied into stores)."""

    name: str
    spec: Any
    export_dir: Path
    session: Any
    dim: int
    head: Head
    head_path: Path
    onnx_sha256: str

    @property
    def key(self) -> tuple:
        """Preprocessing key: networks with equal keys share one input tensor."""
        return preprocess_key(self.spec)


def parse_models(models: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` or a list → canonical registry names, duplicates removed, order kept."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models)]
    out: list[str] = []
    for n in names:
        if not n:
            continue
        c = get_spec(n).name
        if c not in out:
            out.append(c)
    if not out:
        raise AffeqError("no models given", "pass --models A,B,… (see affeq-rt models)")
    return out


def open_networks(models: Sequence[str], provider: str = "auto",
                  export_root: str | os.PathLike | None = None,
                  random_weights: bool = False) -> list[Network]:
    """Export (or reuse the export of) each model and open its features graph."""
    nets = []
    for name in models:
        path = Path(ensure_exported(name, root=export_root, random_weights=random_weights))
        exp = ExportedBackbone(path)
        head = exp.classifier_head()
        sess = create_session(exp.features_path, provider=provider)
        nets.append(Network(name, exp.spec, path, sess, head.dim, head, Path(exp.head_path),
                            sha256_file(exp.features_path)))
    return nets


def spec_dict(spec: Any) -> dict[str, Any]:
    """A spec as plain JSON (BackboneSpec or dict)."""
    return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def run_network(net: Network, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of one network on one preprocessed batch, float32 [r, d]."""
    if x.shape[0] == 0:
        return np.zeros((0, net.dim), np.float32)
    out = np.asarray(net.session.run(x, batch_size=batch_size), np.float32)
    if out.ndim != 2 or out.shape != (x.shape[0], net.dim):
        raise AffeqError(f"{net.name}'s features graph returned shape {out.shape}, expected "
                         f"({x.shape[0]}, {net.dim})", "re-export the model (affeq-rt export)")
    return out


def feature_batches(nets: Sequence[Network], samples: Sequence[Any], batch_size: int,
                    workers: int, start: int = 0) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Yield (batch, {model: float32 features of its readable images}) from sample ``start``."""
    if start >= len(samples):  # a resumed run whose samples were all consumed: nothing left
        return
    specs = [n.spec for n in nets]
    for batch in iter_batches(samples, specs, batch_size=batch_size, workers=workers, start=start):
        feats = {n.name: run_network(n, batch.tensors[n.key], batch_size) for n in nets}
        yield batch, feats


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


def load_data(data: str | os.PathLike | DataSource, labels: str | None = None,
              meta: str | None = None, max_images: int | None = None) -> DataSource:
    """Resolve ``data`` (path or DataSource) with :func:`data.discover`; cut to ``max_images``."""
    src = data if isinstance(data, DataSource) else discover(data, labels=labels, meta=meta)
    return src.head(max_images)


def check_image_options(opt: ImageOptions, dtype: str | None = None,
                        max_images: int | None = None) -> None:
    """AffeqError for a setting no run can use, before any export, decoding or file is made."""
    if int(opt.batch_size) < 1:
        raise AffeqError(f"batch size must be positive, got {opt.batch_size}",
                         "pass --batch-size ≥ 1")
    if int(opt.workers) < 0:
        raise AffeqError(f"--workers must be 0 or more, got {opt.workers}",
                         "pass --workers 0 to decode in this process")
    if max_images is not None and int(max_images) < 1:
        raise AffeqError(f"--max-images must be positive, got {max_images}",
                         "pass --max-images ≥ 1 or leave it out")
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


def extract(models: str | Sequence[str], data: str | os.PathLike | DataSource,
            out: str | os.PathLike, *, dtype: str = "float16", images: ImageOptions | None = None,
            max_images: int | None = None, commit_every: float = 5.0,
            progress: Progress | None = None, executor: Executor | None = None) -> ExtractResult:
    """Run every model over the images and write (or finish) a feature store at ``out``.

    Rows are committed at most every ``commit_every`` seconds (and at the end), always at a batch
    boundary of the sample grid, so a rerun after any interruption redoes the same batches and
    writes the same bytes. ``progress`` counts images (resumed ones included in ``done``).
    ``executor`` (None: this process) runs the networks elsewhere, e.g. on a Ray cluster
    (``affeq_rt.dist.RayExecutor``); it commits shard by shard through the same writer, so the
    store is byte-identical.
    """
    opt = images or ImageOptions()
    check_image_options(opt, dtype, max_images)
    if Path(out).exists() and not Path(out).is_dir():
        raise AffeqError(f"--out {out} is a file, not a feature store folder",
                         "choose a new folder for --out")
    names = parse_models(models)
    src = load_data(data, opt.labels, opt.meta, max_images)
    check_labels(src, min(s.num_classes - s.label_offset for s in map(get_spec, names)))
    nets = open_networks(names, provider=opt.provider, export_root=opt.export_root,
                         random_weights=opt.random_weights)
    heads = {n.name: load_head(n.head_path) for n in nets}
    cfg = StoreConfig(models=names, dims={n.name: n.dim for n in nets},
                      specs={n.name: spec_dict(n.spec) for n in nets},
                      exports={n.name: n.onnx_sha256 for n in nets}, data=src.describe(),
                      dtype=dtype, batch_size=opt.batch_size)
    writer = StoreWriter(out, cfg, heads)
    if writer.already_complete:
        return ExtractResult(Path(out), names, writer.rows, writer.skipped, 0.0, 0.0, 0, True)
    bs = writer.cfg.batch_size  # a resumed store keeps its batch grid
    start = writer.samples_done
    rows = writer.rows
    pending_skips: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    last_commit = t0
    bar = or_silent(progress)
    bar.start("extract", total=len(src), done=start)
    if executor is not None:
        executor.extract_into(writer, src.samples, opt, bar)
        rows = writer.rows
    for batch, feats in (() if executor is not None else
                         feature_batches(nets, src.samples, bs, opt.workers, start=start)):
        for name, f in feats.items():
            writer.write(name, rows, f)
        rows += int(batch.ok.sum())
        pending_skips += [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped]
        bar.advance(batch.stop - batch.start)
        now = time.perf_counter()
        if now - last_commit >= commit_every or batch.stop == len(src):
            writer.commit(batch.stop, rows, pending_skips)
            pending_skips, last_commit = [], now
    bar.done()
    seconds = time.perf_counter() - t0
    rate = (len(src) - start) / seconds if seconds > 0 else 0.0  # this run's images only
    if writer.samples_done != len(src):  # empty tail (start == len) or nothing to do
        writer.commit(len(src), rows, pending_skips)
    if rows == 0:
        first = writer.skipped[0] if writer.skipped else {"path": "?", "reason": "?"}
        writer.discard()  # no rows: no state worth resuming; the corrected command starts over
        raise AffeqError(f"none of the {len(src)} images could be read (e.g. {first['path']}: "
                         f"{first['reason']})", "check --data")
    writer.finalise(src.samples, {"run": {"seconds": seconds, "images_per_s": rate,
                                          "batch_size": bs, "workers": opt.workers,
                                          "provider": opt.provider}})
    return ExtractResult(Path(out), names, writer.rows, writer.skipped, seconds, rate, start)
