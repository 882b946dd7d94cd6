"""Fit every ordered pair of affine maps from ONE pass: joint Gram accumulation, then solve.

Each batch goes through every network; the concatenated features [F_1 … F_k] feed one
``core.GramAccumulator`` (training rows) and a second one (held-out rows), so every pairwise block
comes from the same pass. The accumulators are checkpointed with the count of samples consumed, so
``fit`` resumes like ``extract``. Library entry points: :func:`fit_maps` (arrays, stores, image
folders → maps in memory) and :func:`fit` (the CLI's job, with checkpoints and a maps file).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import ensure_writable_dir, read_json, versions, write_json_atomic
from affeq_rt.io.maps import AffineMap, save_maps
from affeq_rt.io.store import open_store
from affeq_rt.method import solvers

GRAM_METHODS = ("ols", "ridge")
STORE_CHUNK = 4096


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


# ---------------------------------------------------------------------------------------------
# sources of joint feature rows


def _store_chunks(store: Any, names: Sequence[str], n: int,
                  start: int) -> Iterator[tuple[int, int, np.ndarray]]:
    feats = [store.features(m) for m in names]
    for a in range(start, n, STORE_CHUNK):
        b = min(a + STORE_CHUNK, n)
        yield a, b, np.ascontiguousarray(np.concatenate([np.asarray(f[a:b], np.float32)
                                                         for f in feats], axis=1))


def _array_chunks(arrays: Mapping[str, np.ndarray], names: Sequence[str], n: int,
                  start: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for a in range(start, n, STORE_CHUNK):
        b = min(a + STORE_CHUNK, n)
        yield a, b, np.ascontiguousarray(np.concatenate(
            [np.asarray(arrays[m][a:b], np.float32) for m in names], axis=1))


def _feed(acc_t: Any, acc_h: Any, x: np.ndarray, mask: np.ndarray) -> None:
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

    def load(self, device: str) -> tuple[Any, Any, int, dict[str, Any]]:
        from affeq_rt.core.gram import GramAccumulator

        assert self.state is not None
        s = self.seq
        return (GramAccumulator.load(self.folder / f"train.{s}.gram", device=device),
                GramAccumulator.load(self.folder / f"holdout.{s}.gram", device=device),
                int(self.state["samples"]), dict(self.state.get("extra", {})))

    def save(self, acc_t: Any, acc_h: Any, samples: int, extra: dict[str, Any]) -> None:
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
        shutil.rmtree(self.folder, ignore_errors=True)


def accumulate(names: Sequence[str], dims: Mapping[str, int], n: int,
               chunks: Any, holdout: float = 0.1, seed: int = 0, device: str = "auto",
               checkpoint: _Checkpoint | None = None, checkpoint_every: int = 20000,
               bar: Any = None) -> Accumulated:
    """Stream joint rows from ``chunks(start)`` (yielding ``(start, stop, x[rows, Σd])`` over sample
    indices, or ``(start, stop, x, ok)`` with a readable-rows mask) into the two accumulators.

    Commits a checkpoint whenever the sample count crosses a multiple of ``checkpoint_every``,
    and at the end. The positions are fixed by the data, not the clock, because saving flushes
    the accumulator's block buffer: a resumed run then sums exactly the same blocks as an
    uninterrupted one and produces the same bits.
    """
    from affeq_rt.core.gram import GramAccumulator

    sl = _slices(names, dims)
    dim = sum(int(dims[m]) for m in names)
    mask = holdout_mask(n, holdout, seed)
    extra: dict[str, Any] = {"skipped": []}
    if checkpoint is not None and checkpoint.state is not None:
        acc_t, acc_h, start, extra = checkpoint.load(device)
    else:
        acc_t, acc_h = GramAccumulator(dim, device=device), GramAccumulator(dim, device=device)
        start = 0
    if bar is not None:
        bar.skip_to(start)
    every = max(int(checkpoint_every), 1)
    done = start
    for item in chunks(start):
        a, b, x = item[0], item[1], item[2]
        m = mask[a:b]
        if len(item) > 3:  # image batches: unreadable samples have no row
            ok = item[3]
            m = m[ok]
            extra["skipped"] += item[4]
        _feed(acc_t, acc_h, x, m)
        done = b
        if bar is not None:
            bar.advance(b - a)
        if checkpoint is not None and (b // every > a // every or b == n):
            checkpoint.save(acc_t, acc_h, b, extra)
    return Accumulated(acc_t, acc_h, sl, max(done, start), extra)


# ---------------------------------------------------------------------------------------------
# solving


def solve_pairs(acc: Accumulated, names: Sequence[str], method: str = "ols",
                heads: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                offsets: Mapping[str, int] | None = None) -> list[AffineMap]:
    """Every ordered pair A≠B from the accumulated statistics (one eigh per source)."""
    method = normalise_method(method)
    if method not in GRAM_METHODS:
        raise ValueError("solve_pairs handles ols and ridge")
    hold = acc.holdout if int(acc.holdout.n) > 0 else None
    out: list[AffineMap] = []
    for a in names:
        eig = solvers.source_eig(acc.train, acc.slices[a])
        for t in names:
            if t == a:
                continue
            fn = solvers.ols if method == "ols" else solvers.ridge
            w, b, st = fn(acc.train, acc.slices[a], acc.slices[t], hold, eig=eig)
            st["nonfinite_rows_skipped"] = int(acc.train.skipped) + int(acc.holdout.skipped)
            out.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), method, st))
    return out


def heads_pairs(names: Sequence[str], heads: Mapping[str, tuple[np.ndarray, np.ndarray]],
                offsets: Mapping[str, int] | None = None) -> list[AffineMap]:
    """``logit-pinv`` maps for every ordered pair from the classifier heads alone."""
    offsets = offsets or {}
    out = []
    pinvs: dict[tuple[str, int], tuple[np.ndarray, int]] = {}  # one SVD per (target, rows)
    for a in names:
        for t in names:
            if t != a:
                oa, ot = offsets.get(a, 0), offsets.get(t, 0)
                k = min(heads[a][0].shape[0] - oa, heads[t][0].shape[0] - ot)
                if (t, k) not in pinvs:
                    pinvs[t, k] = solvers.head_pinv(heads[t][0][ot:ot + k])
                w, b, st = solvers.logit_pinv(heads[a], heads[t], oa, ot,
                                              pinv_dst=pinvs[t, k])
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
    for i in range(0, rows.size, STORE_CHUNK):
        r = rows[i:i + STORE_CHUNK]
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
# front doors


def fit_maps(source: Any, models: Sequence[str] | None = None, method: str = "ols",
             holdout: float = 0.1, seed: int = 0, max_images: int | None = None,
             heads: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
             offsets: Mapping[str, int] | None = None, device: str = "auto",
             adam_iterations: int = 200, adam_lr: float = 0.1, **data_kw: Any) -> list[AffineMap]:
    """Fit every ordered pair of ``models`` from ``source`` and return the maps (nothing written).

    ``source``: a dict ``{model: [n, d] array}`` (pass ``heads`` for logit-pinv), a
    :class:`~affeq_rt.store.FeatureStore` or store folder, or an image folder (extra keyword
    arguments go to :func:`fit`'s image path: ``batch_size``, ``workers``, ``provider``,
    ``random_weights``, ``export_root``).
    """
    method = normalise_method(method)
    if isinstance(source, Mapping):
        names = list(models or source)
        missing = [m for m in names if m not in source]
        if missing:
            raise AffeqError(f"no features given for {', '.join(missing)}",
                             "pass an array for every model")
        n = min(int(source[m].shape[0]) for m in names)
        if any(int(source[m].shape[0]) != n for m in names):
            raise AffeqError("feature arrays have different row counts",
                             "pass features of the same images, row-aligned")
        n = min(n, max_images or n)
        dims = {m: int(source[m].shape[1]) for m in names}
        return _solve(method, names, dims, n, lambda s: _array_chunks(source, names, n, s),
                      {m: source[m] for m in names}, heads, offsets, holdout, seed, device,
                      adam_iterations, adam_lr)
    if isinstance(source, (str, os.PathLike)) and not (Path(source) / "manifest.json").is_file():
        res = fit(models or [], None, data=source, method=method, holdout=holdout, seed=seed,
                  max_images=max_images, device=device, adam_iterations=adam_iterations, **data_kw)
        return res.maps
    store = open_store(source)
    names = list(models or store.models)
    for m in names:
        store.feature_dim(m)  # AffeqError naming a model missing from the store
    n = min(store.n, max_images or store.n)
    dims = {m: store.feature_dim(m) for m in names}
    heads = heads or {m: store.head(m) for m in names}
    offsets = offsets or {m: int(store.spec(m).get("label_offset", 0)) for m in names}
    return _solve(method, names, dims, n, lambda s: _store_chunks(store, names, n, s),
                  {m: store.features(m)[:n] for m in names}, heads, offsets, holdout, seed,
                  device, adam_iterations, adam_lr)


def _solve(method: str, names: list[str], dims: dict[str, int], n: int, chunks: Any,
           arrays: Mapping[str, Any] | None, heads: Any, offsets: Any, holdout: float, seed: int,
           device: str, adam_iterations: int, adam_lr: float,
           checkpoint: _Checkpoint | None = None, bar: Any = None) -> list[AffineMap]:
    if len(names) < 2:
        raise AffeqError("fitting maps needs at least two models", "pass --models A,B[,…]")
    if method == "naive":
        return naive_pairs(names, dims)
    if method == "logit-pinv":
        if heads is None:
            raise AffeqError("logit-pinv needs the classifier heads", "pass heads= or a store")
        return heads_pairs(names, heads, offsets)
    if method == "adam":
        if arrays is None:
            raise AffeqError("adam streams features from a feature store",
                             "run affeq-rt extract first, then fit --features STORE")
        return adam_pairs(names, arrays, holdout, seed, adam_iterations, adam_lr)
    acc = accumulate(names, dims, n, chunks, holdout, seed, device, checkpoint, bar=bar)
    return solve_pairs(acc, names, method)


@dataclass
class FitResult:
    """What :func:`fit` produced."""

    path: Path | None
    maps: list[AffineMap]
    images: int
    seconds: float
    resumed_from: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """Human summary: one line per pair."""
        lines = [f"fitted {len(self.maps)} maps from {self.images} images in {self.seconds:.1f}s"
                 + (f" -> {self.path}" if self.path else "")]
        if self.resumed_from:
            lines.append(f"resumed from image {self.resumed_from}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s)")
        for m in self.maps:
            r2 = m.stats.get("r2_holdout")
            lines.append(f"  {m.key:40s} {m.method:10s} "
                         f"R²(held-out) {'-' if r2 is None else f'{r2:.4f}'}"
                         + (f"  rank {m.stats['rank']}/{m.stats['source_dim']}"
                            if m.stats.get("rank_deficient") else ""))
        return "\n".join(lines)


def fit(models: str | Sequence[str], out: str | os.PathLike | None, data: Any = None,
        features: Any = None, method: str = "ols", max_images: int | None = None,
        holdout: float = 0.1, seed: int = 0, batch_size: int = 32, workers: int = 2,
        provider: str = "auto", random_weights: bool = False, export_root: str | None = None,
        labels: str | None = None, meta: str | None = None, device: str = "auto",
        checkpoint_every: int = 20000, adam_iterations: int = 200, adam_lr: float = 0.1,
        show_progress: bool = False) -> FitResult:
    """Fit all ordered pairs from images (``data``, one checkpointed pass) or a feature store
    (``features``) and save them to ``out`` (safetensors; skipped when ``out`` is None)."""
    from affeq_rt.method.extract import (
        Progress,
        feature_batches,
        load_data,
        open_networks,
        parse_models,
        spec_dict,
    )

    method = normalise_method(method)
    t0 = time.perf_counter()
    if (data is None) == (features is None):
        raise AffeqError("fit needs exactly one of --data and --features",
                         "pass --data TRAIN_DIR or --features STORE")
    if features is not None:
        store = open_store(features)
        names = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models)
        names = [m for m in names if m] or store.models
        maps = fit_maps(store, names, method, holdout, seed, max_images, device=device,
                        adam_iterations=adam_iterations, adam_lr=adam_lr)
        images = min(store.n, max_images or store.n)
        source = {"kind": "feature-store", "path": str(Path(store.path).resolve()),
                  "n": images, "data": store.manifest.get("data")}
        specs = {m: store.spec(m) for m in names}
        resumed, skipped = 0, []
    else:
        names = parse_models(models)
        if method == "adam":
            raise AffeqError("adam streams features from a feature store",
                             "run affeq-rt extract first, then fit --features STORE")
        src = load_data(data, labels, meta, max_images)
        images = len(src)
        if method in ("naive", "logit-pinv"):
            nets = open_networks(names, provider=provider, export_root=export_root,
                                 random_weights=random_weights)
            heads = {n.name: n.head for n in nets}
            offsets = {n.name: int(spec_dict(n.spec).get("label_offset", 0)) for n in nets}
            maps = _solve(method, names, {n.name: n.dim for n in nets}, 0, None, None, heads,
                          offsets, holdout, seed, device, adam_iterations, adam_lr)
            resumed, skipped = 0, []
            images = 0
        else:
            nets = open_networks(names, provider=provider, export_root=export_root,
                                 random_weights=random_weights)
            dims = {n.name: n.dim for n in nets}
            identity = {"models": names, "exports": {n.name: n.onnx_sha256 for n in nets},
                        "data": src.describe(), "holdout": holdout, "seed": seed,
                        "batch_size": batch_size}
            folder = Path(str(out) + ".partial") if out is not None else None
            ckpt = _Checkpoint(folder, identity) if folder is not None else None
            if ckpt is not None and ckpt.state is not None:
                resumed = int(ckpt.state["samples"])
            else:
                resumed = 0

            def chunks(start: int) -> Iterator[tuple]:
                for batch, feats in feature_batches(nets, src.samples, batch_size, workers, start):
                    x = np.ascontiguousarray(np.concatenate([feats[m] for m in names], axis=1))
                    yield (batch.start, batch.stop, x, batch.ok,
                           [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped])

            with Progress(images, "fit", show_progress) as bar:
                acc = accumulate(names, dims, images, chunks, holdout, seed, device, ckpt,
                                 checkpoint_every, bar=bar)
            skipped = acc.extra.get("skipped", [])
            if int(acc.train.n) + int(acc.holdout.n) == 0:
                raise AffeqError(f"none of the {images} images could be read",
                                 "check --data (see the skipped files)")
            maps = solve_pairs(acc, names, method)
            images = int(acc.train.n) + int(acc.holdout.n)
        source = src.describe()
        specs = {n.name: spec_dict(n.spec) for n in nets}
    seconds = time.perf_counter() - t0
    if out is not None:
        meta_doc = {"method": method, "source": source, "holdout_fraction": holdout, "seed": seed,
                    "max_images": max_images, "specs": specs, "versions": versions(),
                    "skipped": skipped}
        save_maps(out, maps, meta_doc)
        if features is None and method in GRAM_METHODS:
            shutil.rmtree(Path(str(out) + ".partial"), ignore_errors=True)
    return FitResult(Path(out) if out is not None else None, maps, images, seconds, resumed,
                     skipped)
