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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import ensure_writable_dir, read_json, versions, write_json_atomic
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet, save_maps
from affeq_rt.method import select, solvers
from affeq_rt.method.curve import MAX_ROWS, Curve, CurveRecorder, curve_sizes
from affeq_rt.method.executor import Executor
from affeq_rt.method.extract import ImageOptions, check_image_options
from affeq_rt.method.rows import CHUNK, RowSource, row_source, source_groups, source_labels
from affeq_rt.method.similarity import RowNorms, SimilarityTable, similarity_from_moments
from affeq_rt.progress import Progress, or_silent

GRAM_METHODS = ("ols", "ridge")


def normalise_method(method: str) -> str:
    """Accept ``logit_pinv``/``logit-pinv`` etc.; AffeqError for unknown methods."""
    m = method.strip().lower().replace("_", "-")
    if m not in solvers.METHODS:
        raise AffeqError(f"unknown fit method {method!r}",
                         f"use one of {', '.join(solvers.METHODS)}")
    return m


def holdout_mask(n: int, fraction: float, seed: int = 0, groups: np.ndarray | None = None
                 ) -> np.ndarray:
    """Deterministic held-out selection: bool [n], about ``fraction`` of the groups, whole.

    One uniform draw per group (ids 0…G−1, ``rows.group_ids``; None: each sample its own group, the
    draws then being exactly the per-sample draws of earlier versions) and a group is held out
    when its draw is below ``fraction``. When that leaves no group out but there are ≥ 2, the
    group with the smallest draw is held out, so a small fit still gets an honest figure.
    """
    if not 0.0 <= fraction < 1.0:
        raise AffeqError(f"--holdout must be in [0, 1), got {fraction}", "pass e.g. --holdout 0.1")
    if fraction == 0.0:
        return np.zeros(n, bool)
    g = np.arange(n) if groups is None else np.asarray(groups, np.int64)[:n]
    count = int(g.max()) + 1 if n else 0
    draws = np.random.default_rng(seed).random(count)
    out = draws < fraction
    if count >= 2 and not out.any():
        out[int(np.argmin(draws))] = True
    return out[g]


def model_slices(names: Sequence[str], dims: Mapping[str, int]) -> dict[str, slice]:
    """Where each model's features sit in the joint row [F_1 … F_k]."""
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
    norms: RowNorms | None = None  # row statistics of every row (debiased CKA), when asked


def feed_rows(acc_t: GramAccumulator, acc_h: GramAccumulator, x: np.ndarray,
              mask: np.ndarray) -> None:
    """Training rows to ``acc_t``, held-out rows to ``acc_h`` (row order kept; ``mask`` marks
    the held-out ones). The one way rows enter a fit's accumulators, here or on a worker."""
    if mask.any():
        if (~mask).any():
            acc_t.update(np.ascontiguousarray(x[~mask]))
        acc_h.update(np.ascontiguousarray(x[mask]))
    elif x.shape[0]:
        acc_t.update(x)


def fit_identity(rows: RowSource, holdout: float, seed: int) -> dict[str, Any] | None:
    """What a resumable fit's checkpoint must match (None: the source is not checkpointed)."""
    ident = rows.identity()
    return None if ident is None else {**ident, "holdout": holdout, "seed": seed}


def refuse_other_fit(folder: Path, found: Any, identity: Mapping[str, Any]) -> None:
    """AffeqError when the checkpoint in ``folder`` (identity ``found``) is another fit's."""
    if found != identity:
        raise AffeqError(f"checkpoint {folder} belongs to a different fit (models, data, "
                         "holdout or batch size differ)",
                         "delete that folder or choose another --out")


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
            refuse_other_fit(folder, st.get("identity"), identity)
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
               progress: Progress | None = None, *, snapshots: Sequence[int] = (),
               on_snapshot: Callable[[GramAccumulator], dict[str, Any]] | None = None,
               row_norms: bool = False) -> Accumulated:
    """Stream ``rows.chunks(start)`` into the two accumulators (held-out samples:
    :func:`holdout_mask` over sample indices; unreadable samples have no row).

    Commits a checkpoint whenever the sample count crosses a multiple of ``checkpoint_every``,
    and at the end. The positions are fixed by the data, not the clock, because saving flushes
    the accumulator's block buffer: a resumed run then sums exactly the same blocks as an
    uninterrupted one and produces the same bits.

    ``snapshots`` (training-row counts, NaN rows included) call ``on_snapshot`` with
    ``GramAccumulator.snapshot()`` of the training accumulator once it has taken exactly that
    many rows (a chunk is split there; splitting an update changes no sum). The snapshot is a
    copy, so the accumulator's blocks are untouched and the maps are the same bits with or
    without snapshots; each result is kept in ``extra["curve"]`` (checkpointed, so a resumed
    run keeps the points taken before the interruption).

    ``row_norms``: also keep ``method.similarity.RowNorms`` of every row (training and held-out,
    as the merged Gram), checkpointed in ``extra["row_norms"]`` (``Accumulated.norms``).
    """
    names, dims, n = rows.names, rows.dims(), rows.n
    sl = model_slices(names, dims)
    dim = sum(int(dims[m]) for m in names)
    mask = holdout_mask(n, holdout, seed, source_groups(rows))
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
    norms = None
    if row_norms:
        state = extra.get("row_norms")
        norms = RowNorms(sl, dim) if state is None else RowNorms.from_state(sl, dim, state)
    fed = int(extra.get("train_fed", 0))  # training rows fed so far (snapshot positions)
    pending = sorted(p for p in snapshots if p > fed) if on_snapshot is not None else []
    curve = extra.setdefault("curve", []) if pending else extra.get("curve", [])
    for c in rows.chunks(start):
        a, b = c.start, c.stop
        m = mask[a:b]
        if c.ok is not None:  # image batches: unreadable samples have no row
            m = m[c.ok]
            extra["skipped"] += c.skipped
        x = c.x
        if norms is not None:
            norms.update(x)
        while pending and on_snapshot is not None:
            train_idx = np.flatnonzero(~m)
            if fed + train_idx.size < pending[0]:
                break
            cut = int(train_idx[pending[0] - fed - 1]) + 1  # rows up to the point's last one
            feed_rows(acc_t, acc_h, x[:cut], m[:cut])
            x, m, fed = x[cut:], m[cut:], pending.pop(0)
            curve.append(on_snapshot(acc_t.snapshot()))
        feed_rows(acc_t, acc_h, x, m)
        fed += int((~m).sum())
        extra["train_fed"] = fed
        done = b
        bar.advance(b - a)
        if checkpoint is not None and (b // every > a // every or b == n):
            if norms is not None:
                extra["row_norms"] = norms.to_state()
            checkpoint.save(acc_t, acc_h, b, extra)
    bar.done()
    return Accumulated(acc_t, acc_h, sl, max(done, start), extra, norms)


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


# ---------------------------------------------------------------------------------------------
# few data: rows in memory, estimators shrunk toward logit-pinv (method.select), quality gate

QUALITY_ROWS = 5000  # held-out rows scored for agreement/top-1 (R² from the Gram uses all)


def collect_rows(rows: RowSource, progress: Progress | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Every joint row in memory: (x float32 [m, Σd], sample index [m], skipped samples)."""
    dims = rows.dims()
    select.rows_fit_in_memory(rows.n, [dims[m] for m in rows.names])
    xs, idx, skipped = [], [], []
    bar = or_silent(progress)
    bar.start("fit", total=rows.n, done=0)
    for c in rows.chunks(0):
        i = np.arange(c.start, c.stop)
        if c.ok is not None:
            i = i[c.ok]
            skipped += c.skipped
        xs.append(np.asarray(c.x, np.float32))
        idx.append(i)
        bar.advance(c.stop - c.start)
    bar.done()
    width = sum(int(dims[m]) for m in rows.names)
    return (np.concatenate(xs) if xs else np.zeros((0, width), np.float32),
            np.concatenate(idx) if idx else np.zeros(0, np.int64), skipped)


def _priors(names: Sequence[str], heads: Mapping[str, Head]) -> dict[tuple[str, str], Any]:
    """The logit-pinv map of every ordered pair (:class:`select.Prior`), one SVD per target."""
    pinvs = {t: solvers.head_pinv(heads[t].weight) for t in names}
    return {(a, t): select.Prior.of(heads[a], heads[t], pinvs[t])
            for a in names for t in names if a != t}


def prior_pairs(x: np.ndarray, idx: np.ndarray, slices: Mapping[str, slice],
                names: Sequence[str], heads: Mapping[str, Head], method: str, mask: np.ndarray,
                groups: np.ndarray | None, labels: np.ndarray | None, seed: int
                ) -> list[AffineMap]:
    """prior-ridge / prior-pca for every ordered pair from in-memory rows: CV on the training
    groups, refit on them, then the grouped held-out figures (:func:`select.map_quality`)."""
    hold = mask[idx]
    g = None if groups is None else groups[idx]
    lab = None if labels is None else labels[idx]
    cv_lab = lab[~hold] if lab is not None and bool((lab[~hold] >= 0).all()) else None
    out = []
    for (a, t), prior in _priors(names, heads).items():
        xa, xb = x[:, slices[a]], x[:, slices[t]]
        w, b, st = select.prior_fit(xa[~hold], xb[~hold], None if g is None else g[~hold],
                                    prior, method, cv_lab, seed)
        st.update(select.map_quality(w, b, xa[hold], xb[hold], prior,
                                     None if lab is None else lab[hold]))
        out.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), method, st))
    return out


class _HeldOutTap:
    """A streamed (image) row source that keeps the first :data:`QUALITY_ROWS` held-out rows it
    yields, so the quality gate can score maps fitted from images (everything else delegates)."""

    def __init__(self, rows: RowSource, mask: np.ndarray) -> None:
        self._rows, self._mask = rows, mask
        self.kept: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rows, name)

    def chunks(self, start: int) -> Any:
        """The source's chunks, unchanged; held-out rows copied aside on the way."""
        for c in self._rows.chunks(start):
            i = np.arange(c.start, c.stop)
            if c.ok is not None:
                i = i[c.ok]
            m = self._mask[i]
            if m.any() and self.count < QUALITY_ROWS:
                take = np.flatnonzero(m)[:QUALITY_ROWS - self.count]
                self.kept.append(np.array(c.x[take], np.float32))
                self.index.append(i[take])
                self.count += take.size
            yield c

    def score(self, maps: Sequence[AffineMap], heads: Mapping[str, Head] | None,
              labels: np.ndarray | None) -> None:
        """:func:`add_quality` on the kept rows."""
        if not self.kept:
            return
        x = np.concatenate(self.kept)
        sl = model_slices(self._rows.names, self._rows.dims())
        idx = np.concatenate(self.index)
        add_quality(maps, {m: x[:, sl[m]] for m in self._rows.names}, heads,
                    np.ones(x.shape[0], bool), None if labels is None else labels[idx])


def add_quality(maps: Sequence[AffineMap], arrays: Mapping[str, Any] | None,
                heads: Mapping[str, Head] | None, mask: np.ndarray,
                labels: np.ndarray | None) -> None:
    """Held-out agreement/top-1 beside the logit-pinv map's, for maps fitted on addressable rows
    (the first :data:`QUALITY_ROWS` held-out rows); R² stays the one the fit computed."""
    if arrays is None or heads is None:
        return
    rows = np.flatnonzero(mask)[:QUALITY_ROWS]
    names = sorted({m.src for m in maps} | {m.dst for m in maps})
    pinvs = {t: solvers.head_pinv(heads[t].weight) for t in names}
    base = {(m.src, m.dst): select.Baseline.of(heads[m.src], heads[m.dst], pinvs[m.dst])
            for m in maps if heads[m.src].num_classes == heads[m.dst].num_classes}
    for m in maps:
        if (m.src, m.dst) not in base:  # other label sets: agreement means nothing
            continue
        q = select.map_quality(m.weight.astype(np.float64), m.bias.astype(np.float64),
                               np.asarray(arrays[m.src][rows]), np.asarray(arrays[m.dst][rows]),
                               base[m.src, m.dst], None if labels is None else labels[rows])
        q.pop("holdout_images")
        if "r2_holdout" in m.stats:
            q.pop("r2_holdout", None)
        m.stats.update(q)


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
               iterations: int, lr: float = 0.1, batch_size: int = 2048,
               groups: np.ndarray | None = None) -> list[AffineMap]:
    """The paper's Adam fit for every ordered pair, streamed from (memory-mapped) arrays."""
    n = int(arrays[names[0]].shape[0])
    mask = holdout_mask(n, holdout, seed, groups)
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
    executor: Executor | None = None  # where the Gram pass runs (None: here; dist.RayExecutor)
    curve: str | tuple[int, ...] = "auto"  # data-efficiency curve sizes: auto | off | (1000, …)
    curve_rows: int = MAX_ROWS  # held-out rows each curve point is scored on
    similarity: bool = False  # CKA/CCA/R²/Procrustes of every pair from this fit's Gram state


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
    curve: Curve | None = None  # data-efficiency curve (method.curve), None when not taken
    similarity: SimilarityTable | None = None  # method.similarity over the fit's images, if asked

    def summary(self) -> str:
        """Human summary: one line per pair."""
        lines = [f"fitted {len(self.maps)} maps from {self.images} images in {self.seconds:.1f}s"
                 + (f" -> {self.path}" if self.path else "")]
        if self.resumed_from:
            lines.append(f"resumed from image {self.resumed_from}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s)")
        choice = self.maps.meta.get("method_choice")
        if choice:
            lines.append(f"method auto -> {choice['method']}: {choice['why']}")
        by = self.maps.meta.get("held_out_by")
        if by == "group":
            lines.append("held out by source image: the views of one photo are all in or all out")
        for m in self.maps.values():
            lines.append("  " + select.quality_line(m.key, m.method, m.stats))
        for m in self.maps.values():
            lines += [f"  warning: {m.key}: {w}" for w in m.stats.get("warnings", [])]
        return "\n".join(lines)


def _refuse_early(models: str | Sequence[str] | None, images: ImageOptions | None,
                  opt: FitOptions) -> None:
    """Settings no fit can use, refused before any export, pass or checkpoint (issue 10)."""
    if images is not None:
        check_image_options(images, None, opt.max_images)
    elif opt.max_images is not None and int(opt.max_images) < 1:
        raise AffeqError(f"--max-images must be positive, got {opt.max_images}",
                         "pass --max-images ≥ 1 or leave it out")
    curve_sizes(opt.curve, 0)  # AffeqError for sizes that are not image counts, whatever the method
    names = models.split(",") if isinstance(models, str) else list(models or [])
    if models is not None and len({str(m).strip() for m in names if str(m).strip()}) < 2:
        # names as given (store/array names need not be registry names); aliases of one network
        # are caught after resolution below
        raise AffeqError("fitting maps needs at least two models", "pass --models A,B[,…]")


def _curve_recorder(opt: FitOptions, rows: RowSource, mask: np.ndarray,
                    heads: Mapping[str, Head] | None, labels: np.ndarray | None,
                    n_train: int) -> CurveRecorder | None:
    """The data-efficiency curve's recorder (``method.curve``), or None when it is off: asked
    off, too few training rows for its first point, or rows that are not addressable (images;
    an explicit ``curve`` then is an error) or a distributed executor."""
    explicit = not (isinstance(opt.curve, str) and opt.curve.strip().lower() in ("auto", "off"))
    sizes = curve_sizes(opt.curve, n_train)
    arrays = rows.arrays()
    if arrays is None or opt.executor is not None:
        if explicit and sizes:
            raise AffeqError("the data-efficiency curve scores held-out rows, which an image "
                             "folder (or a distributed pass) does not keep",
                             "extract a feature store and fit --features STORE, or --no-curve")
        return None
    if not sizes or not mask.any():
        return None
    return CurveRecorder(sizes, model_slices(rows.names, rows.dims()), arrays, heads, labels, mask,
                         opt.device, opt.curve_rows)


def fit(source: Any, models: str | Sequence[str] | None = None, method: str = "auto", *,
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
    _refuse_early(models, images, opt)
    t0 = time.perf_counter()
    rows = row_source(source, models, images, opt.max_images)
    names = rows.names
    if len(names) < 2:
        raise AffeqError("fitting maps needs at least two models", "pass --models A,B[,…]")
    streamed = rows.arrays() is None  # images: counted as read; arrays/stores: rows given
    resumed, skipped, rate, ckpt = 0, [], 0.0, None
    curve = sim = None
    groups, labels = source_groups(rows), source_labels(rows)
    mask = holdout_mask(rows.n, opt.holdout, opt.seed, groups)
    heads = rows.heads()
    choice, tap = None, None
    if method == "auto":  # by data size (method.select.choose_method), said in the summary
        same = heads is not None and len({h.num_classes for h in heads.values()}) == 1
        method, why = select.choose_method(int((~mask).sum()), rows.dims(), same)
        if opt.executor is not None and method not in GRAM_METHODS:
            why += f"; {method} holds its few rows in memory and runs here, not on the executor"
        choice = {"method": method, "why": why}
    elif opt.executor is not None and method in ("adam", *solvers.PRIOR_METHODS):
        raise AffeqError(f"--executor spreads the Gram pass of ols/ridge; {method} reads its rows "
                         "in this process",
                         f"drop --executor for {method}, or fit --method ols|ridge on the cluster")
    if method == "adam":
        arrays = rows.arrays()
        if arrays is None:
            raise AffeqError("adam streams features from a feature store",
                             "run affeq-rt extract first, then fit --features STORE")
        maps = adam_pairs(names, arrays, opt.holdout, opt.seed, opt.adam_iterations, opt.adam_lr,
                          groups=groups)
        images = rows.n
    elif method in ("naive", "logit-pinv"):
        if method == "naive":
            maps = naive_pairs(names, rows.dims())
        else:
            if heads is None:
                raise AffeqError("logit-pinv needs the classifier heads",
                                 "fit from a feature store or images, not bare arrays")
            maps = heads_pairs(names, heads)
        images = 0 if streamed else rows.n
    elif method in solvers.PRIOR_METHODS:
        if heads is None:
            raise AffeqError(f"{method} shrinks toward the logit-pinv map, which needs the "
                             "classifier heads",
                             "fit from a feature store or images, not bare arrays (or use ridge)")
        x, idx, skipped = collect_rows(rows, progress)
        if x.shape[0] == 0 and streamed:
            raise AffeqError(f"none of the {rows.n} images could be read",
                             "check --data (see the skipped files)")
        maps = prior_pairs(x, idx, model_slices(names, rows.dims()), names, heads, method, mask,
                           groups, labels, opt.seed)
        images = int(x.shape[0]) if streamed else rows.n
    else:
        # keep held-out rows for the gate; not with checkpoints (``out``): a resumed run would
        # score fewer rows than an uninterrupted one, and their files must be the same bytes
        if streamed and heads is not None and opt.executor is None and out is None:
            rows = tap = _HeldOutTap(rows, mask)
        n_train = int((~mask).sum())
        if n_train < 2:  # known before the pass: refuse now, leave no <out>.partial/
            raise AffeqError(f"a map needs at least 2 training images, got {n_train} of "
                             f"{rows.n} (holdout {opt.holdout:g})",
                             "use more images (--max-images) or a smaller --holdout")
        ident = fit_identity(rows, opt.holdout, opt.seed) if out is not None else None
        if ident is not None:
            ckpt = _Checkpoint(Path(str(out) + ".partial"), ident)
            resumed = int(ckpt.state["samples"]) if ckpt.state is not None else 0
        recorder = _curve_recorder(opt, rows, mask, heads, labels, n_train)
        snap: dict[str, Any] = {} if recorder is None else {"snapshots": recorder.sizes,
                                                            "on_snapshot": recorder.score}
        snap["row_norms"] = opt.similarity
        t1 = time.perf_counter()
        if opt.executor is None:
            acc = accumulate(rows, opt.holdout, opt.seed, opt.device, ckpt, opt.checkpoint_every,
                             progress, **snap)
        else:  # shards on the executor's workers, partial Grams merged in shard order
            acc = opt.executor.accumulate(rows, opt.holdout, opt.seed, opt.device,
                                          ckpt.folder if ckpt is not None else None, progress)
        dt = time.perf_counter() - t1
        rate = (acc.samples - resumed) / dt if dt > 0 else 0.0
        skipped = acc.extra.get("skipped", [])
        read = int(acc.train.n) + int(acc.holdout.n)
        try:
            if read == 0 and streamed:
                raise AffeqError(f"none of the {rows.n} images could be read",
                                 "check --data (see the skipped files)")
            maps = solve_pairs(acc, names, method)
            if recorder is not None and opt.executor is None:
                curve = recorder.finish(acc.train, acc.extra.get("curve", []))
            if opt.similarity:  # every image of the pass: training and held-out Grams merged
                both = acc.train + acc.holdout if int(acc.holdout.n) else acc.train
                sim = similarity_from_moments(both, acc.slices, getattr(acc, "norms", None),
                                              source=rows.describe())
        except AffeqError:  # a finished pass that cannot be solved: no checkpoint to resume
            if ckpt is not None:
                ckpt.remove()
            raise
        images = read if streamed else rows.n
    if tap is not None:
        tap.score(maps, heads, labels)
    elif method not in solvers.PRIOR_METHODS:
        add_quality(maps, rows.arrays(), heads, mask, labels)
    for m in maps:  # the quality gate (FitResult.summary and build-hybrid print these)
        m.stats["warnings"] = select.quality_warnings(m.stats, m.method)
        if choice is not None:
            m.stats["method_choice"] = choice["why"]
    meta = {"method": method, "source": rows.describe(), "holdout_fraction": opt.holdout,
            "seed": opt.seed, "max_images": opt.max_images, "specs": rows.specs(),
            "versions": versions(), "skipped": skipped,
            "held_out_by": "group" if groups is not None else "image"}
    if choice is not None:
        meta["method_choice"] = choice
    mapset = MapSet(maps, meta, str(out) if out is not None else "")
    if out is not None:
        save_maps(out, mapset)
        if ckpt is not None:
            ckpt.remove()
    return FitResult(Path(out) if out is not None else None, mapset, images,
                     time.perf_counter() - t0, resumed, skipped, rate, curve=curve,
                     similarity=sim)
