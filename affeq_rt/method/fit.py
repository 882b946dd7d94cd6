"""Fit every ordered pair of affine maps from ONE pass: joint Gram accumulation, then solve.

:func:`fit` is the one front door. It reads joint feature rows [F_1 … F_k] from a row source
(``method.rows``: arrays, a feature store, or an image folder decoded once); the rows feed one
``core.GramAccumulator`` (training rows) and a second one (held-out rows), so every pairwise block
comes from the same pass. On images with ``out``, the accumulators are checkpointed in
``<out>.partial/`` with the count of samples consumed, so a rerun resumes like ``extract`` and
writes the same bytes. Logit-pinv and naive maps need no rows; Adam reads addressable arrays.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import ensure_writable_dir, read_json, versions, write_json_atomic
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet, save_maps
from affeq_rt.method import solvers
from affeq_rt.method.extract import ImageOptions
from affeq_rt.method.rows import CHUNK, RowSource, row_source
from affeq_rt.progress import Progress, or_silent

GRAM_METHODS = ("ols", "ridge")


def normalise_method(method: str) -> str:
    """Accept ``logit_pinv``/``logit-pinv`` etc.; AffeqError for unknown methods."""
    m = method.strip().lower().replace("_", "-")
    if m not in solvers.METHODS:
        raise AffeqError(f"unknown fit method {method!r}",
                         f"use one of {', '.join(solvers.METHODS)}")
    return m


def holdout_mask(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministic held-out selection: bool [n], about ``fraction`` of the samples."""
    if not 0.0 <= fraction < 1.0:
        raise AffeqError(f"--holdout must be in [0, 1), got {fraction}", "pass e.g. --holdout 0.1")
    if fraction == 0.0:
        return np.zeros(n, bool)
    return np.random.default_rng(seed).random(n) < fraction


def _slices(names: Sequence[str], dims: Mapping[str, int]) -> dict[str, slice]:
    out, o = {}, 0
    for n in names:
        out[n] = slice(o, o + int(dims[n]))
        o += int(dims[n])
    return out


@dataclass
class Accumulated:
    """The two joint accumulators and where each model sits in the joint vector."""

    train: Any
    holdout: Any
    slices: dict[str, slice]
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)


def _feed(acc_t: GramAccumulator, acc_h: GramAccumulator, x: np.ndarray, mask: np.ndarray) -> None:
    """Training rows to ``acc_t``, held-out rows to ``acc_h`` (row order kept)."""
    if mask.any():
        if (~mask).any():
            acc_t.update(np.ascontiguousarray(x[~mask]))
        acc_h.update(np.ascontiguousarray(x[mask]))
    elif x.shape[0]:
        acc_t.update(x)


class _Checkpoint:
    """``<out>.partial/``: numbered accumulator states, then ``fit.json`` (atomic commit)."""

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = folder
        self.identity = identity
        self.seq = 0
        self.state: dict[str, Any] | None = None
        mf = folder / "fit.json"
        if mf.is_file():
            st = read_json(mf, "fit checkpoint")
            if st.get("identity") != identity:
                raise AffeqError(f"checkpoint {folder} belongs to a different fit (models, data, "
                                 "holdout or batch size differ)",
                                 "delete that folder or choose another --out")
            self.state = st
            self.seq = int(st["seq"])

    def load(self, device: str) -> tuple[GramAccumulator, GramAccumulator, int, dict[str, Any]]:
        if self.state is None:
            raise InternalError("no checkpoint to load")
        s = self.seq
        return (GramAccumulator.load(self.folder / f"train.{s}.gram", device=device),
                GramAccumulator.load(self.folder / f"holdout.{s}.gram", device=device),
                int(self.state["samples"]), dict(self.state.get("extra", {})))

    def save(self, acc_t: GramAccumulator, acc_h: GramAccumulator, samples: int,
             extra: dict[str, Any]) -> None:
        ensure_writable_dir(self.folder)
        s = self.seq + 1
        acc_t.save(self.folder / f"train.{s}.gram")
        acc_h.save(self.folder / f"holdout.{s}.gram")
        write_json_atomic(self.folder / "fit.json", {"identity": self.identity, "seq": s,
                                                     "samples": samples, "extra": extra})
        for old in self.folder.glob("*.gram"):
            if old.name not in (f"train.{s}.gram", f"holdout.{s}.gram"):
                old.unlink(missing_ok=True)
        self.seq = s

    def remove(self) -> None:
        """Delete the checkpoint folder (the fit is saved)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def accumulate(rows: RowSource, holdout: float = 0.1, seed: int = 0, device: str = "auto",
               checkpoint: _Checkpoint | None = None, checkpoint_every: int = 20000,
               progress: Progress | None = None) -> Accumulated:
    """Stream ``rows.chunks(start)`` into the two accumulators (held-out samples:
    :func:`holdout_mask` over sample indices; unreadable samples have no row).

    Commits a checkpoint whenever the sample count crosses a multiple of ``checkpoint_every``,
    and at the end. The positions are fixed by the data, not the clock, because saving flushes
    the accumulator's block buffer: a resumed run then sums exactly the same blocks as an
    uninterrupted one and produces the same bits.
    """
    names, dims, n = rows.names, rows.dims(), rows.n
    sl = _slices(names, dims)
    dim = sum(int(dims[m]) for m in names)
    mask = holdout_mask(n, holdout, seed)
    extra: dict[str, Any] = {"skipped": []}
    if checkpoint is not None and checkpoint.state is not None:
        acc_t, acc_h, start, extra = checkpoint.load(device)
    else:
        acc_t, acc_h = GramAccumulator(dim, device=device), GramAccumulator(dim, device=device)
        start = 0
    bar = or_silent(progress)
    bar.start("fit", total=n, done=start)
    every = max(int(checkpoint_every), 1)
    done = start
    for c in rows.chunks(start):
        a, b = c.start, c.stop
        m = mask[a:b]
        if c.ok is not None:  # image batches: unreadable samples have no row
            m = m[c.ok]
            extra["skipped"] += c.skipped
        _feed(acc_t, acc_h, c.x, m)
        done = b
        bar.advance(b - a)
        if checkpoint is not None and (b // every > a // every or b == n):
            checkpoint.save(acc_t, acc_h, b, extra)
    bar.done()
    return Accumulated(acc_t, acc_h, sl, max(done, start), extra)


# ---------------------------------------------------------------------------------------------
# solving


def solve_pairs(acc: Accumulated, names: Sequence[str], method: str = "ols") -> list[AffineMap]:
    """Every ordered pair A≠B from the accumulated statistics (one eigh per source)."""
    if method not in GRAM_METHODS:
        raise InternalError(f"solve_pairs handles ols and ridge, not {method}")
    hold = acc.holdout if int(acc.holdout.n) > 0 else None
    fn = solvers.ols if method == "ols" else solvers.ridge
    out: list[AffineMap] = []
    for a in names:
        eig = solvers.source_eig(acc.train, acc.slices[a])
        for t in names:
            if t == a:
                continue
            w, b, st = fn(acc.train, acc.slices[a], acc.slices[t], hold, eig=eig)
            st["nonfinite_rows_skipped"] = int(acc.train.skipped) + int(acc.holdout.skipped)
            out.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), method, st))
    return out


def heads_pairs(names: Sequence[str], heads: Mapping[str, Head]) -> list[AffineMap]:
    """``logit-pinv`` maps for every ordered pair from the classifier heads alone (background
    rows already stripped by :class:`~affeq_rt.io.heads.Head`)."""
    out = []
    pinvs: dict[str, tuple[np.ndarray, int]] = {}  # one SVD per target
    for a in names:
        for t in names:
            if t != a:
                if t not in pinvs:
                    pinvs[t] = solvers.head_pinv(heads[t].weight)
                w, b, st = solvers.logit_pinv((heads[a].weight, heads[a].bias),
                                              (heads[t].weight, heads[t].bias),
                                              pinv_dst=pinvs[t])
                out.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32),
                                     "logit-pinv", {"images": 0, **st}))
    return out


def naive_pairs(names: Sequence[str], dims: Mapping[str, int]) -> list[AffineMap]:
    """``naive`` (truncate / zero-pad) maps for every ordered pair."""
    out = []
    for a in names:
        for t in names:
            if t != a:
                w, b, st = solvers.naive(int(dims[a]), int(dims[t]))
                out.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), "naive",
                                     {"images": 0, **st}))
    return out


def _array_r2(w: np.ndarray, b: np.ndarray, xa: Any, xb: Any, rows: np.ndarray) -> float | None:
    """R² of a map on the given rows of two arrays (chunked, float64)."""
    if rows.size == 0:
        return None
    ss = 0.0
    s1 = np.zeros(xb.shape[1])
    s2 = 0.0
    for i in range(0, rows.size, CHUNK):
        r = rows[i:i + CHUNK]
        a = np.asarray(xa[r], np.float64)
        y = np.asarray(xb[r], np.float64)
        ss += float(((y - a @ w.T - b) ** 2).sum())
        s1 += y.sum(0)
        s2 += float((y * y).sum())
    tot = s2 - float(s1 @ s1) / rows.size
    return 1.0 - ss / tot if tot > 0 else None


def adam_pairs(names: Sequence[str], arrays: Mapping[str, Any], holdout: float, seed: int,
               iterations: int, lr: float = 0.1, batch_size: int = 2048) -> list[AffineMap]:
    """The paper's Adam fit for every ordered pair, streamed from (memory-mapped) arrays."""
    n = int(arrays[names[0]].shape[0])
    mask = holdout_mask(n, holdout, seed)
    train_rows, hold_rows = np.flatnonzero(~mask), np.flatnonzero(mask)
    out = []
    for a in names:
        for t in names:
            if t == a:
                continue
            w, b, st = solvers.adam(arrays[a], arrays[t], iterations=iterations, lr=lr,
                                    batch_size=batch_size, seed=seed, rows=train_rows)
            st.update(holdout_images=int(hold_rows.size),
                      r2_holdout=_array_r2(w, b, arrays[a], arrays[t], hold_rows),
                      unit_loss_holdout=(solvers.unit_loss(w, b, np.asarray(arrays[a][hold_rows]),
                                                           np.asarray(arrays[t][hold_rows]))
                                         if hold_rows.size else None))
            out.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), "adam", st))
    return out


# ---------------------------------------------------------------------------------------------
# the front door


@dataclass(frozen=True)
class FitOptions:
    """The knobs of a fit (image reading has its own: ``method.extract.ImageOptions``)."""

    holdout: float = 0.1  # fraction of samples held out for R² (and ridge's λ)
    seed: int = 0  # seed of the held-out split and of Adam's batches
    max_images: int | None = None  # use only the first N samples
    device: str = "auto"  # Gram accumulator: auto|cpu|cuda
    checkpoint_every: int = 20000  # images between checkpoints (image sources with ``out``)
    adam_iterations: int = 200
    adam_lr: float = 0.1


@dataclass
class FitResult:
    """What :func:`fit` produced: the maps, and how the run went."""

    path: Path | None
    maps: MapSet
    images: int
    seconds: float
    resumed_from: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    images_per_s: float = 0.0  # this run's samples (resumed ones excluded) per second

    def summary(self) -> str:
        """Human summary: one line per pair."""
        lines = [f"fitted {len(self.maps)} maps from {self.images} images in {self.seconds:.1f}s"
                 + (f" -> {self.path}" if self.path else "")]
        if self.resumed_from:
            lines.append(f"resumed from image {self.resumed_from}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s)")
        for m in self.maps.values():
            r2 = m.stats.get("r2_holdout")
            lines.append(f"  {m.key:40s} {m.method:10s} "
                         f"R²(held-out) {'-' if r2 is None else f'{r2:.4f}'}"
                         + (f"  rank {m.stats['rank']}/{m.stats['source_dim']}"
                            if m.stats.get("rank_deficient") else ""))
        return "\n".join(lines)


def fit(source: Any, models: str | Sequence[str] | None = None, method: str = "ols", *,
        out: str | os.PathLike | None = None, options: FitOptions | None = None,
        images: ImageOptions | None = None, progress: Progress | None = None) -> FitResult:
    """Fit every ordered pair A≠B of ``models`` (default: all of the source's) from ``source``.

    ``source``: ``{model: [n, d]}`` arrays, a FeatureStore (or store folder, or an in-memory
    ``ArrayStore``), an image folder/list file/``DataSource`` (read with ``images``), or any
    :class:`~affeq_rt.method.rows.RowSource`. Returns the maps (``FitResult.maps``, a MapSet whose
    ``meta`` is the file metadata); with ``out`` also saves them (safetensors). On images with
    ``out``, OLS/ridge checkpoint into ``<out>.partial/`` and a rerun resumes there. ``progress``
    counts samples.
    """
    method = normalise_method(method)
    opt = options or FitOptions()
    holdout_mask(0, opt.holdout)  # AffeqError for a bad fraction, before any work
    t0 = time.perf_counter()
    rows = row_source(source, models, images, opt.max_images)
    names = rows.names
    if len(names) < 2:
        raise AffeqError("fitting maps needs at least two models", "pass --models A,B[,…]")
    streamed = rows.arrays() is None  # images: counted as read; arrays/stores: rows given
    resumed, skipped, rate, ckpt = 0, [], 0.0, None
    if method == "adam":
        arrays = rows.arrays()
        if arrays is None:
            raise AffeqError("adam streams features from a feature store",
                             "run affeq-rt extract first, then fit --features STORE")
        maps = adam_pairs(names, arrays, opt.holdout, opt.seed, opt.adam_iterations, opt.adam_lr)
        images = rows.n
    elif method in ("naive", "logit-pinv"):
        if method == "naive":
            maps = naive_pairs(names, rows.dims())
        else:
            heads = rows.heads()
            if heads is None:
                raise AffeqError("logit-pinv needs the classifier heads",
                                 "fit from a feature store or images, not bare arrays")
            maps = heads_pairs(names, heads)
        images = 0 if streamed else rows.n
    else:
        ident = rows.identity() if out is not None else None
        if ident is not None:
            ckpt = _Checkpoint(Path(str(out) + ".partial"),
                               {**ident, "holdout": opt.holdout, "seed": opt.seed})
            resumed = int(ckpt.state["samples"]) if ckpt.state is not None else 0
        t1 = time.perf_counter()
        acc = accumulate(rows, opt.holdout, opt.seed, opt.device, ckpt, opt.checkpoint_every,
                         progress)
        dt = time.perf_counter() - t1
        rate = (acc.samples - resumed) / dt if dt > 0 else 0.0
        skipped = acc.extra.get("skipped", [])
        read = int(acc.train.n) + int(acc.holdout.n)
        if read == 0 and streamed:
            raise AffeqError(f"none of the {rows.n} images could be read",
                             "check --data (see the skipped files)")
        maps = solve_pairs(acc, names, method)
        images = read if streamed else rows.n
    meta = {"method": method, "source": rows.describe(), "holdout_fraction": opt.holdout,
            "seed": opt.seed, "max_images": opt.max_images, "specs": rows.specs(),
            "versions": versions(), "skipped": skipped}
    mapset = MapSet(maps, meta, str(out) if out is not None else "")
    if out is not None:
        save_maps(out, mapset)
        if ckpt is not None:
            ckpt.remove()
    return FitResult(Path(out) if out is not None else None, mapset, images,
                     time.perf_counter() - t0, resumed, skipped, rate)
