"""``fit``: every ordered pair of affine maps from ONE pass over the rows, by any fit method.

The one front door. It reads joint feature rows [F_1 … F_k] from a row source (``method.rows``:
arrays, a feature store, or an image folder decoded once), asks the chosen method
(``method.methods``: a registered strategy) which statistics it needs (``method.reducers``), runs
one pass of the engine (``engine.run_pass``) on the chosen executor (this process, or a Ray
cluster: ``affeq_rt.cluster``), and lets the method solve. On images with ``out`` the pass is
checkpointed in ``<out>.partial/`` (``engine.checkpoint``: one format), so a rerun resumes and
writes the same bytes. Every fit then passes the quality gate (``method.quality``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affeq_rt.engine import Executor, LocalExecutor, PassCheckpoint, Reducer, run_pass
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import output_lock, versions
from affeq_rt.io.maps import AffineMap, MapSet, save_maps
from affeq_rt.method import controls, quality
from affeq_rt.method.curve import MAX_ROWS, Curve, CurveRecorder, curve_sizes
from affeq_rt.method.extract import ImageOptions, check_image_options, check_max_images
from affeq_rt.method.holdout import after_pass, fit_groups, pass_reducers, summary_lines
from affeq_rt.method.methods import (
    REGISTRY,
    FitContext,
    FitMethod,
    choose,
    holdout_mask,
    normalise_method,
)
from affeq_rt.method.reducers import HeldOutRows, Skipped
from affeq_rt.method.rows import RowSource, model_slices, row_source, source_labels
from affeq_rt.method.similarity import SimilarityTable, knn_rows, similarity_from_moments
from affeq_rt.progress import Progress


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
    executor: Executor = field(default_factory=LocalExecutor)  # where the pass runs
    curve: str | tuple[int, ...] = "auto"  # data-efficiency curve sizes: auto | off | (1000, …)
    curve_rows: int = MAX_ROWS  # held-out rows each curve point is scored on
    similarity: bool = False  # CKA/CCA/R²/Procrustes of every pair from this fit's Gram state
    dedup: bool = True  # near-duplicate images found and held out together (method.dedup)
    rank: int | None = None  # low-rank's rank (None: chosen on the held-out Gram)
    controls: bool = False  # noise and shuffled-row control maps from the same pass (controls)


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
        if self.maps.meta.get("held_out_by") == "group":
            lines.append("held out by source image: the views of one photo are all in or all out")
        lines += summary_lines(self.maps.meta)
        lines += ["  " + quality.quality_line(m.key, m.method, m.stats) for m in self.maps.values()]
        for m in self.maps.values():
            lines += [f"  warning: {m.key}: {w}" for w in m.stats.get("warnings", [])]
        return "\n".join(lines)


def _refuse_early(models: str | Sequence[str] | None, images: ImageOptions | None,
                  opt: FitOptions) -> None:
    """Settings no fit can use, refused before any export, pass or checkpoint (issue 10)."""
    if images is not None:
        check_image_options(images, None, opt.max_images)
    else:
        check_max_images(opt.max_images)
    curve_sizes(opt.curve, 0)  # AffeqError for sizes that are not image counts, whatever the method
    names = models.split(",") if isinstance(models, str) else list(models or [])
    if models is not None and len({str(m).strip() for m in names if str(m).strip()}) < 2:
        # names as given (store/array names need not be registry names); aliases of one network
        # are caught after resolution below
        raise AffeqError("fitting maps needs at least two models", "pass --models A,B[,…]")


def _curve_recorder(ctx: FitContext) -> CurveRecorder | None:
    """The data-efficiency curve's recorder (``method.curve``), or None when it is off: asked
    off, too few training rows for its first point, or rows that are not addressable (images;
    an explicit ``curve`` then is an error)."""
    opt = ctx.options
    explicit = not (isinstance(opt.curve, str) and opt.curve.strip().lower() in ("auto", "off"))
    sizes = curve_sizes(opt.curve, int((~ctx.mask).sum()))
    arrays = ctx.rows.arrays()
    if arrays is None:
        if explicit and sizes:
            raise AffeqError("the data-efficiency curve scores held-out rows, which an image "
                             "folder does not keep",
                             "extract a feature store and fit --features STORE, or --no-curve")
        return None
    if not sizes or not ctx.mask.any():
        return None
    return CurveRecorder(sizes, ctx.slices, arrays, ctx.heads, ctx.labels, ctx.mask, opt.device,
                         opt.curve_rows)


def _context(rows: RowSource, opt: FitOptions) -> FitContext:
    """What every method sees of this fit."""
    names, n = rows.names, rows.n  # the data first: a missing folder is refused before exports
    if len(names) < 2:
        raise AffeqError("fitting maps needs at least two models", "pass --models A,B[,…]")
    dims = rows.dims()
    slices, local = model_slices(names, dims), isinstance(opt.executor, LocalExecutor)
    groups, found = fit_groups(rows, slices, opt.dedup)  # file names + near-duplicates
    mask = holdout_mask(n, opt.holdout, opt.seed, groups)
    return FitContext(rows, names, dims, slices, rows.heads(), mask, groups,
                      source_labels(rows), opt, local, None, found)


def _method(name: str, ctx: FitContext) -> tuple[FitMethod, dict[str, str] | None]:
    """The method to run (``auto`` chosen by data size, with why), checked against ``ctx``."""
    choice = None
    if name == "auto":
        name, why = choose(ctx)
        choice = {"method": name, "why": why}
    strat = REGISTRY[name].from_options(ctx.options)
    strat.check(ctx)
    return strat, choice


def _reducers(strat: FitMethod, ctx: FitContext, out: Any) -> dict[str, Reducer]:
    """The method's statistics, plus held-out rows for the gate on streamed images (not with a
    checkpoint: a resumed run would keep other rows) and the skipped samples."""
    red = {**strat.reducers(ctx), **pass_reducers(ctx, strat.needs)}
    if ctx.options.controls:  # negative controls: statistics of the same pass (method.controls)
        red.update(controls.fit_reducers(ctx, strat.needs))
    if red and strat.needs == "gram" and ctx.streamed and ctx.heads is not None and out is None:
        red["heldout"] = HeldOutRows(ctx.mask, quality.QUALITY_ROWS)
    if red:
        red["skipped"] = Skipped()
    return red


def _checkpoint(strat: FitMethod, ctx: FitContext, out: Any) -> PassCheckpoint | None:
    """``<out>.partial/`` for a resumable source (images) with ``out``."""
    ident = ctx.rows.identity() if out is not None else None
    if ident is None:
        return None
    o = ctx.options
    return PassCheckpoint(Path(str(out) + ".partial"),
                          {**ident, "holdout": o.holdout, "seed": o.seed, "needs": strat.needs,
                           "similarity": bool(o.similarity), "dedup": o.dedup,
                           **({"controls": True} if o.controls else {})},
                          every=o.checkpoint_every)


@dataclass
class _Extras:
    """What a pass gave besides the maps."""

    curve: Curve | None = None
    similarity: SimilarityTable | None = None
    resumed: int = 0
    rate: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _pass(ctx: FitContext, red: dict[str, Reducer], ckpt: PassCheckpoint | None,
          progress: Progress | None) -> _Extras:
    """Run the pass (nothing to do without reducers)."""
    if not red:
        return _Extras()
    t1 = time.perf_counter()
    ex = ctx.options.executor
    p = run_pass(ctx.rows, red, executor=ex, checkpoint=ckpt, progress=progress, task="fit",
                 shard=ex.shard_size or ctx.options.checkpoint_every)
    dt = time.perf_counter() - t1
    return _Extras(resumed=p.resumed_from, rate=(p.done - p.resumed_from) / dt if dt > 0 else 0.0,
                   skipped=red["skipped"].items)


def _solve(strat: FitMethod, ctx: FitContext, red: Mapping[str, Any], ex: _Extras
           ) -> list[AffineMap]:
    """The method's maps, and the curve (``ctx.curve``) and similarity of a Gram pass."""
    if strat.needs == "gram" and ctx.streamed and strat.images(ctx, red) == 0:
        raise AffeqError(f"none of the {ctx.rows.n} images could be read",
                         "check --data (see the skipped files)")
    after_pass(ctx, red)  # image folders: the near-duplicate groups from this pass's rows
    maps = strat.solve(ctx, red)
    g = red.get("gram")
    if g is not None and ctx.curve is not None:
        ex.curve = ctx.curve.finish(g.train, g.points)
    if g is not None and ctx.options.similarity:  # every image: train + held-out merged
        both = g.train + g.holdout if int(g.holdout.n) else g.train
        ex.similarity = similarity_from_moments(both, ctx.slices, g.norms, knn=knn_rows(
            ctx.rows, red), source=ctx.rows.describe())
    return maps


def fit(source: Any, models: str | Sequence[str] | None = None, method: str = "auto", *,
        out: str | os.PathLike | None = None, options: FitOptions | None = None,
        images: ImageOptions | None = None, progress: Progress | None = None) -> FitResult:
    """Fit every ordered pair A≠B of ``models`` (default: all of the source's) from ``source``.

    ``source``: ``{model: [n, d]}`` arrays, a FeatureStore (or store folder, or an in-memory
    ``ArrayStore``), an image folder/list file/``DataSource`` (read with ``images``), or any
    :class:`~affeq_rt.method.rows.RowSource`. Returns the maps (``FitResult.maps``, a MapSet whose
    ``meta`` is the file metadata); with ``out`` also saves them (safetensors). On images with
    ``out`` the pass checkpoints into ``<out>.partial/`` and a rerun resumes there. ``progress``
    counts samples.
    """
    name = normalise_method(method)
    opt = options or FitOptions()
    holdout_mask(0, opt.holdout)  # AffeqError for a bad fraction, before any work
    _refuse_early(models, images, opt)
    t0 = time.perf_counter()
    ctx = _context(row_source(source, models, images, opt.max_images), opt)
    strat, choice = _method(name, ctx)
    ctx.curve = _curve_recorder(ctx) if strat.needs == "gram" else None
    red = _reducers(strat, ctx, out)
    with output_lock(out, "maps file") if out is not None else nullcontext():
        ckpt = _checkpoint(strat, ctx, out) if red else None
        ex = _pass(ctx, red, ckpt, progress)
        try:
            maps = _solve(strat, ctx, red, ex)
        except AffeqError:  # a finished pass that cannot be solved: no checkpoint to resume
            if ckpt is not None:
                ckpt.remove()
            raise
        quality.gate(maps, ctx, red, strat.needs == "rows", choice)
        if opt.controls:  # after the gate: a control has no features of its own to gate on
            maps = [*maps, *controls.control_maps(ctx, red, strat)]
        mapset = MapSet(maps, _meta(strat.name, ctx, ex, choice),
                        str(out) if out is not None else "")
        if out is not None:
            save_maps(out, mapset)
            if ckpt is not None:
                ckpt.remove()
    return FitResult(Path(out) if out is not None else None, mapset, strat.images(ctx, red),
                     time.perf_counter() - t0, ex.resumed, ex.skipped, ex.rate, curve=ex.curve,
                     similarity=ex.similarity)


def _meta(method: str, ctx: FitContext, ex: _Extras,
          choice: dict[str, str] | None) -> dict[str, Any]:
    """The maps file's metadata."""
    o = ctx.options
    meta = {"method": method, "source": ctx.rows.describe(), "holdout_fraction": o.holdout,
            "seed": o.seed, "max_images": o.max_images, "specs": ctx.rows.specs(),
            "versions": versions(), "skipped": ex.skipped,
            "held_out_by": "group" if ctx.groups is not None else "image",
            "near_duplicates": ctx.found.meta()}
    if choice is not None:
        meta["method_choice"] = choice
    return meta
