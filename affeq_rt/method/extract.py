"""Decode-once feature extraction: each image decoded once, fed to every network, rows to a store.

:func:`open_networks` resolves names, exports (or reuses) each backbone and opens its
``features.onnx``; :func:`feature_batches` streams (batch, features-per-model) from the decode-once
loader; :func:`extract` writes a resumable :class:`~affeq_rt.store.FeatureStore`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import preprocess_key
from affeq_rt.data.readers import Batch, DataSource, discover, iter_batches
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import sha256_file


@dataclass
class Network:
    """One opened backbone: canonical name, spec, export folder, ORT session, feature width."""

    name: str
    spec: Any
    export_dir: Path
    session: Any
    dim: int
    head: tuple[np.ndarray, np.ndarray]
    onnx_sha256: str

    @property
    def key(self) -> tuple:
        """Preprocessing key: networks with equal keys share one input tensor."""
        return preprocess_key(self.spec)


def parse_models(models: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` or a list → canonical registry names, duplicates removed, order kept."""
    from affeq_rt.registry.spec import get_spec

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


def open_networks(models: Sequence[str], provider: str = "auto", export_root: str | None = None,
                  random_weights: bool = False) -> list[Network]:
    """Export (or reuse the export of) each model and open its features graph."""
    from affeq_rt.onnx.export import ExportedBackbone, ensure_exported
    from affeq_rt.onnx.runtime import create_session

    nets = []
    for name in models:
        path = Path(ensure_exported(name, root=export_root, random_weights=random_weights))
        exp = ExportedBackbone(path)
        w, b = exp.head()
        sess = create_session(exp.features_path, provider=provider)
        spec = exp.spec
        nets.append(Network(name, spec, path, sess, int(np.asarray(w).shape[1]),
                            (np.asarray(w, np.float32), np.asarray(b, np.float32)),
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
    specs = [n.spec for n in nets]
    for batch in iter_batches(samples, specs, batch_size=batch_size, workers=workers, start=start):
        feats = {n.name: run_network(n, batch.tensors[n.key], batch_size) for n in nets}
        yield batch, feats


class Progress:
    """A rich progress bar with images/s and ETA (or nothing when disabled)."""

    def __init__(self, total: int, description: str, enabled: bool, done: int = 0) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.start_done = done
        self.done = done
        self._stack = contextlib.ExitStack()
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
                                     TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(description, total=total, completed=done, rate="-")

    def __enter__(self) -> Progress:
        if self.enabled:
            self._stack.enter_context(self._bar)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    @property
    def rate(self) -> float:
        """Images per second in this run (resumed images excluded)."""
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    def skip_to(self, done: int) -> None:
        """Resume the count at ``done`` images; those do not count towards the rate."""
        self.start_done = self.done = done
        self.t0 = time.perf_counter()
        if self.enabled:
            self._bar.update(self._task, completed=done)

    def advance(self, n: int) -> None:
        """Count ``n`` more images."""
        self.done += n
        if self.enabled:
            self._bar.update(self._task, advance=n, rate=f"{self.rate:.1f}")


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


def extract(models: str | Sequence[str], data: str | os.PathLike | DataSource,
            out: str | os.PathLike, dtype: str = "float16", batch_size: int = 32, workers: int = 2,
            provider: str = "auto", max_images: int | None = None, random_weights: bool = False,
            export_root: str | None = None, labels: str | None = None, meta: str | None = None,
            show_progress: bool = False, commit_every: float = 5.0) -> ExtractResult:
    """Run every model over the images and write (or finish) a feature store at ``out``.

    Rows are committed at most every ``commit_every`` seconds (and at the end), always at a batch
    boundary of the sample grid, so a rerun after any interruption redoes the same batches and
    writes the same bytes.
    """
    from affeq_rt.io.store import StoreConfig, StoreWriter

    names = parse_models(models)
    src = load_data(data, labels, meta, max_images)
    nets = open_networks(names, provider=provider, export_root=export_root,
                         random_weights=random_weights)
    cfg = StoreConfig(models=names, dims={n.name: n.dim for n in nets},
                      specs={n.name: spec_dict(n.spec) for n in nets},
                      exports={n.name: n.onnx_sha256 for n in nets}, data=src.describe(),
                      dtype=dtype, batch_size=batch_size)
    writer = StoreWriter(out, cfg, {n.name: n.head for n in nets})
    if writer.already_complete:
        return ExtractResult(Path(out), names, writer.rows, writer.skipped, 0.0, 0.0, 0, True)
    bs = writer.cfg.batch_size  # a resumed store keeps its batch grid
    start = writer.samples_done
    rows = writer.rows
    pending_skips: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    last_commit = t0
    with Progress(len(src), "extract", show_progress, done=start) as bar:
        for batch, feats in feature_batches(nets, src.samples, bs, workers, start=start):
            for name, f in feats.items():
                writer.write(name, rows, f)
            rows += int(batch.ok.sum())
            pending_skips += [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped]
            bar.advance(batch.stop - batch.start)
            now = time.perf_counter()
            if now - last_commit >= commit_every or batch.stop == len(src):
                writer.commit(batch.stop, rows, pending_skips)
                pending_skips, last_commit = [], now
        rate = bar.rate
    if writer.samples_done != len(src):  # empty tail (start == len) or nothing to do
        writer.commit(len(src), rows, pending_skips)
    if rows == 0:
        first = writer.skipped[0] if writer.skipped else {"path": "?", "reason": "?"}
        raise AffeqError(f"none of the {len(src)} images could be read (e.g. {first['path']}: "
                         f"{first['reason']})", "check --data")
    seconds = time.perf_counter() - t0
    writer.finalise(src.samples, {"run": {"seconds": seconds, "images_per_s": rate,
                                          "batch_size": bs, "workers": workers,
                                          "provider": provider}})
    return ExtractResult(Path(out), names, writer.rows, writer.skipped, seconds, rate, start)
