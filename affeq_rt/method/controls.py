"""Negative controls of the hybrid table (issue 22 item 2): is this equivalence real?

A hybrid C_B(M F_A) that scores well shows that B's classifier can read A's mapped features. It does
not show, by itself, that A *shares* anything with B: a fitted map may get there from any features
that carry structure (Smith, Mannering, Marcu, ICML 2025, "Functional alignment can mislead"). So
the same N×N evaluation is run for control sources, each fitted by the same least squares and scored
through the same folded heads on the same evaluation images:

- ``A~random``: A's architecture with random weights. Its features are a network of their own in
  the store (one more network in the same image pass when extracted; the demo computes them beside
  the trained networks); fitted as any network, recognised here by the name.
- ``A~noise``: structured noise, Smith et al.'s clustered noise. On the fitting rows each image
  gets the Gaussian cluster of **the target's predicted class** (centres N(0, I), spread N(0, I) in
  A's dimension, then A's training mean and per-dimension standard deviation), so a map *can*
  exploit the structure: it learns cluster c → B's class c, and fits in-sample (its ``r2_train``)
  as well as the noise allows. On the evaluation rows a noise source cannot see the image, so each
  row's cluster is drawn from the fitting rows' class frequencies, independently of the image. That
  is the fair control: the strongest map a meaningless source can get, scored the way every source
  is scored (only what it computes from the image reaches the classifier). Its expected score is
  what a predictor that ignores the image reaches: Σ_c p_c q_c ≤ max_c q_c, the best constant guess
  (:attr:`ControlTable.chance`). Tied to the *evaluation* image's class instead, the noise would be
  handed the answer and "beat" every real network; that would measure the tie, not the map.
- ``A~shuffled``: the map fitted on mismatched pairs: A's training rows paired with B's through the
  permutation of the null (``reducers.PermutedCross`` with the fit's hold-out mask: within-chunk
  seeded permutations, permutation 0), then applied to A's real evaluation features. It keeps
  each network's statistics and destroys what the images share.

For the Gram methods (ols, ridge, orthogonal, low-rank) control maps are ordinary least squares
(the thesis's estimator, minimum norm below full rank: the map freest to exploit whatever a
control carries), from statistics of fit's one pass (noise: :class:`NoiseCross`, Σz, Σzzᵀ, Σz x_Bᵀ
per pair; shuffled: permuted cross blocks), stored in the maps file as pairs ``A~noise->B`` and
``A~shuffled->B`` (their ``stats['control']`` says which).

For the rows methods (prior-ridge, prior-pca: every row of the pass in memory, ``AllRows``) the
control maps are fitted by **the same estimator** as the real maps (:func:`rows_control_maps`):
``select.prior_fit`` with the same prior (the pair's logit-pinv map), CV seed, folds' groups and
criterion, on control rows materialised from the kept rows; no reducer of their own.

- noise: A's rows replaced by :func:`noise_rows` (the same ``fit_noise`` rows, tied to B's
  predicted class on each training row, at A's training mean and per-dimension standard
  deviation: the numbers :func:`noise_map` takes from the Gram, here from the rows), B's rows and
  the CV's truth unchanged; stats keys as :func:`noise_map` writes them (:func:`noise_stats`), so
  evaluate scores both kinds alike.
- shuffled: one seeded permutation of **all** the training rows (``chunk_permutation(0, 0, m)``
  over the m training rows in sample order), the later network of each pair (in the fit's model
  order) permuted, as ``PermutedCross`` permutes the second of each pair block: both directions
  of a pair use the same mismatched pairs. The Gram version permutes within each 4,096-row chunk
  (the pass cannot hold more); when every training row lies in the pass's first chunk (≤ 4,096
  samples, no non-finite row: the few-data case these methods serve) the two are the same
  permutation of the same rows, beyond it the Gram's is a within-chunk restriction of a uniform
  one. The CV folds follow the *source* row (its group keeps its views together), the CV's truth
  the *target* row (its label, or B's own prediction on it).

What to expect of the rows controls: the noise control scores near chance at evaluation (its rows
ignore the image, whatever the map). The shuffled control need not: no correction to the prior
helps on mismatched pairs, so its CV scores every candidate near chance, and the one-standard-error
rule then often keeps the most shrunk one, the prior itself. That control map is the logit-pinv
map, which reads A's real features through the heads and scores what that data-free hybrid scores,
far above chance; its margin then measures what the images taught the real map beyond the
prior, not whether A and B share anything (the random-weight control asks that). When the real
map kept the prior too, the shuffled control is bit for bit the hybrid's own map: it cannot
discriminate, and the verdict leaves it out, saying so (:func:`same_map_pairs`,
``ControlTable.same_map``). Where the CV moves off the prior, the control scores near chance.

Scoring every control map is a statistic of evaluate's one pass (:class:`ControlTally`): no pass
of their own, and no image for noise or shuffled.

A hybrid **beats** a control when real − control > 2 standard errors of the difference of two
proportions over the n evaluation images, SE = sqrt(p_r(1−p_r) + p_c(1−p_c)) / sqrt(n) (taken as
independent; scored on the same images they are positively correlated, so this SE is conservative).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from affeq_rt.core.evaluate import evaluate_heads
from affeq_rt.engine.reducer import Chunk, State
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet, fold_head
from affeq_rt.method import select, solvers
from affeq_rt.method.null import _Permuted
from affeq_rt.method.reducers import PermutedCross, chunk_permutation

KINDS = ("random", "noise", "shuffled")  # display order
MEANINGS = {
    "random": "the source architecture with random weights",
    "noise": "clustered Gaussian noise (Smith et al. 2025), clusters tied to the target's class "
             "on the fitting images",
    "shuffled": "the map fitted on mismatched image pairs (rows shuffled)",
}
SEP = "~"  # control source names: f"{network}~{kind}"
CONTROL_SEED = 22
BLOCK = 256  # noise rows are drawn per block of 256 sample indices: any chunking gives the same
BEAT_SE = 2.0  # standard errors a hybrid must clear over each control


def control_name(network: str, kind: str) -> str:
    """The control source ``network~kind``."""
    return f"{network}{SEP}{kind}"


def parse_control(name: str) -> tuple[str, str] | None:
    """(network, kind) of a control source name, or None for a network."""
    net, sep, kind = name.rpartition(SEP)
    return (net, kind) if sep and net and kind in KINDS else None


def real_networks(names: Sequence[str]) -> list[str]:
    """The names that are not control sources."""
    return [m for m in names if parse_control(m) is None]


def pair_seed(src: str, dst: str) -> int:
    """A stable integer per ordered pair (the noise streams' key)."""
    return zlib.crc32(f"{src}->{dst}".encode())


# ----------------------------------------------------------------------------------------------
# the noise source


def _blocked(stream: int, seed: int, index: np.ndarray, make: Callable[[np.random.Generator],
             np.ndarray]) -> np.ndarray:
    """Rows for sample indices ``index``: block ``i // BLOCK`` drawn by
    ``make(default_rng([CONTROL_SEED, stream, seed, block]))`` (BLOCK rows), row ``i % BLOCK`` kept,
    so the rows of a sample do not depend on how the samples are chunked or sharded."""
    index = np.asarray(index, np.int64)
    blocks = index // BLOCK
    out: np.ndarray | None = None
    for blk in np.unique(blocks):
        rows = make(np.random.default_rng([CONTROL_SEED, stream, seed, int(blk)]))
        if out is None:
            out = np.empty((index.size, *rows.shape[1:]), rows.dtype)
        sel = blocks == blk
        out[sel] = rows[index[sel] % BLOCK]
    if out is None:
        return np.zeros((0,), np.float64)
    return out


class Centres:
    """Cluster centres of one pair's noise: class c's centre N(0, I_d), seeded by (pair, c)."""

    def __init__(self, seed: int, dim: int) -> None:
        self.seed, self.dim = int(seed), int(dim)
        self._c: dict[int, np.ndarray] = {}

    def __call__(self, classes: np.ndarray) -> np.ndarray:
        """Centres of ``classes`` ``[r, d]``."""
        for c in np.unique(classes):
            if int(c) not in self._c:
                self._c[int(c)] = np.random.default_rng(
                    [CONTROL_SEED, 0, self.seed, int(c)]).standard_normal(self.dim)
        if not len(classes):
            return np.zeros((0, self.dim))
        return np.stack([self._c[int(c)] for c in classes])


def fit_noise(seed: int, dim: int, index: np.ndarray, classes: np.ndarray,
              centres: Centres | None = None) -> np.ndarray:
    """Unit-scale noise rows of the fitting samples ``index``: the centre of each row's class (the
    target's prediction) plus N(0, I) spread (stream 1). ``[r, dim]`` float64."""
    centres = centres or Centres(seed, dim)
    eps = _blocked(1, seed, index, lambda g: g.standard_normal((BLOCK, dim)))
    return centres(classes) + eps.reshape(len(index), dim)


def eval_noise(stats: Mapping[str, Any], dim: int, index: np.ndarray,
               centres: Centres | None = None) -> np.ndarray:
    """The noise control's features of evaluation samples ``index`` (``[r, dim]`` float32): a
    cluster drawn from the fitting rows' class frequencies (stream 3), independent of the image,
    plus fresh spread (stream 2), at A's training mean and per-dimension scale."""
    seed = int(stats["noise_seed"])
    classes = np.asarray(stats["noise_classes"], np.int64)
    p = np.asarray(stats["noise_counts"], np.float64)
    p = p / p.sum()
    drawn = _blocked(3, seed, index, lambda g: g.choice(classes, size=BLOCK, p=p))
    eps = _blocked(2, seed, index, lambda g: g.standard_normal((BLOCK, dim)))
    z = (centres or Centres(seed, dim))(drawn.reshape(-1)) + eps.reshape(len(index), dim)
    mean, scale = np.asarray(stats["noise_mean"]), np.asarray(stats["noise_scale"])
    return (mean + scale * z).astype(np.float32)


def predicted(head: Head, x: np.ndarray) -> np.ndarray:
    """The head's top-1 class of rows ``x`` (float64 logits; ties to the lowest class)."""
    w = np.asarray(head.weight, np.float64)
    return np.argmax(np.asarray(x, np.float64) @ w.T + np.asarray(head.bias, np.float64), axis=1)


class NoiseCross:
    """The fitting rows' noise statistics per ordered pair (A, B): n, Σz, Σzzᵀ, Σz x_Bᵀ, Σx_B and
    the count of B's predicted classes (unit-scale z, :func:`fit_noise`), over the training rows
    (``mask`` False) whose joint row is finite (the rows the Gram takes)."""

    def __init__(self, slices: Mapping[str, slice], mask: np.ndarray,
                 heads: Mapping[str, Head], pairs: Sequence[tuple[str, str]]) -> None:
        self.slices, self.mask, self.heads = dict(slices), mask, dict(heads)
        self.pairs = [tuple(p) for p in pairs]
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}
        for a, t in self.pairs:
            da, dt, k = self._w(a), self._w(t), self.heads[t].num_classes
            key = f"{a}|{t}"
            self.sums.update({f"{key}|z": np.zeros(da), f"{key}|zz": np.zeros((da, da)),
                              f"{key}|zt": np.zeros((da, dt)), f"{key}|t": np.zeros(dt),
                              f"{key}|counts": np.zeros(k, np.int64)})
        self._centres: dict[str, Centres] = {}

    def _w(self, m: str) -> int:
        return self.slices[m].stop - self.slices[m].start

    def fresh(self) -> NoiseCross:
        """An empty one of the same configuration."""
        return NoiseCross(self.slices, self.mask, self.heads, self.pairs)

    def __getstate__(self) -> dict[str, Any]:
        """Travel without the cached centres."""
        return {k: v for k, v in self.__dict__.items() if k != "_centres"}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__dict__.update(st)
        self._centres = {}

    def update(self, c: Chunk) -> None:
        """The chunk's training rows: their targets' classes, noise rows and sums."""
        keep = ~self.mask[c.index]
        x = np.asarray(c.x, np.float64)[keep]
        idx = c.index[keep]
        fin = np.isfinite(x).all(axis=1)
        x, idx = x[fin], idx[fin]
        if not x.shape[0]:
            return
        targets = {t for _, t in self.pairs}
        cls = {t: predicted(self.heads[t], x[:, self.slices[t]]) for t in targets}
        for a, t in self.pairs:
            key, seed = f"{a}|{t}", pair_seed(a, t)
            cen = self._centres.setdefault(key, Centres(seed, self._w(a)))
            z = fit_noise(seed, self._w(a), idx, cls[t], cen)
            xt = x[:, self.slices[t]]
            self.sums[f"{key}|z"] += z.sum(0)
            self.sums[f"{key}|zz"] += z.T @ z
            self.sums[f"{key}|zt"] += z.T @ xt
            self.sums[f"{key}|t"] += xt.sum(0)
            self.sums[f"{key}|counts"] += np.bincount(cls[t], minlength=self.heads[t].num_classes)
        self.n += int(x.shape[0])

    def merge(self, other: NoiseCross) -> None:
        """Add the following shard's sums."""
        for k, v in other.sums.items():
            self.sums[k] += v
        self.n += other.n

    def state(self) -> State:
        """The sums and the row count."""
        return {"n": self.n, **self.sums}

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.n = int(st["n"])
        self.sums = {k: np.asarray(st[k], v.dtype).reshape(v.shape) for k, v in self.sums.items()}


def noise_scale(scatter_diag: np.ndarray, n: int) -> np.ndarray:
    """A's per-dimension standard deviation over its ``n`` training rows (population, ddof 0)
    from the diagonal of their centred scatter: the scale of every noise control."""
    return np.sqrt(np.clip(np.asarray(scatter_diag, np.float64), 0, None) / n)


def noise_stats(a: str, t: str, counts: np.ndarray, mean: np.ndarray, scale: np.ndarray
                ) -> dict[str, Any]:
    """The stats a noise control map carries for evaluate (:func:`eval_noise`): the pair's seed,
    the classes B predicted on the fitting rows with their counts, A's training mean and scale."""
    counts = np.asarray(counts)
    seen = np.flatnonzero(counts)
    return {"control": "noise", "noise_seed": pair_seed(a, t), "noise_classes": seen.tolist(),
            "noise_counts": counts[seen].tolist(), "noise_mean": np.asarray(mean).tolist(),
            "noise_scale": np.asarray(scale).tolist()}


def noise_rows(a: str, t: str, index: np.ndarray, classes: np.ndarray, mean: np.ndarray,
               scale: np.ndarray) -> np.ndarray:
    """Pair (A, B)'s noise rows of the fitting samples ``index`` (float64 ``[r, d_A]``):
    :func:`fit_noise` tied to B's predicted ``classes``, at A's training ``mean`` and ``scale``
    (the rows whose moments :func:`noise_map` solves from)."""
    return mean + scale * fit_noise(pair_seed(a, t), len(mean), index, classes)


class _Blocks:
    """Moments of the joint rows [s ⊙ z + μ, x_B] of one pair (``solvers.Moments``): the source
    block at slice(0, d_A), the target block after it."""

    eps = float(np.finfo(np.float64).eps)

    def __init__(self, n: int, mean: np.ndarray, blocks: dict[tuple[int, int], np.ndarray],
                 da: int) -> None:
        self.n, self._mean, self._b, self.da = int(n), mean, blocks, da

    def mean(self) -> np.ndarray:
        """Joint mean."""
        return self._mean

    def scatter(self, rows: slice, cols: slice) -> np.ndarray:
        """Centred scatter block (source = 0, target = 1)."""
        i, j = int(rows.start >= self.da), int(cols.start >= self.da)
        return self._b[(i, j)] if (i, j) in self._b else self._b[(j, i)].T


def noise_map(cross: NoiseCross, a: str, t: str, train: Any) -> AffineMap:
    """The OLS map of pair (A, B)'s noise source, scaled to A's training mean and per-dimension
    standard deviation (``train``: the fit's training Gram, over the same rows)."""
    n = int(train.n)
    if n != cross.n:
        raise InternalError(f"noise statistics cover {cross.n} rows but the Gram {n}")
    sa, st_ = cross.slices[a], cross.slices[t]
    key = f"{a}|{t}"
    zbar, tbar = cross.sums[f"{key}|z"] / n, cross.sums[f"{key}|t"] / n
    s_zz = cross.sums[f"{key}|zz"] - n * np.outer(zbar, zbar)
    s_zt = cross.sums[f"{key}|zt"] - n * np.outer(zbar, tbar)
    mu_a = np.asarray(train.mean(), np.float64)[sa]
    scale = noise_scale(np.diag(np.asarray(train.scatter(sa, sa), np.float64)), n)
    da = sa.stop - sa.start
    m = _Blocks(n, np.concatenate([mu_a + scale * zbar, tbar]),
                {(0, 0): scale[:, None] * s_zz * scale[None, :], (0, 1): scale[:, None] * s_zt,
                 (1, 1): np.asarray(train.scatter(st_, st_), np.float64)}, da)
    w, b, stats = solvers.ols(m, slice(0, da), slice(da, da + st_.stop - st_.start))
    stats.update(noise_stats(a, t, cross.sums[f"{key}|counts"], mu_a, scale))
    return AffineMap(control_name(a, "noise"), t, w.astype(np.float32), b.astype(np.float32),
                     "ols", stats)


# ----------------------------------------------------------------------------------------------
# in fit's pass


def control_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered pair of networks (control sources left out)."""
    real = real_networks(names)
    return [(a, t) for a in real for t in real if a != t]


def fit_reducers(ctx: Any, needs: str) -> dict[str, Any]:
    """The controls' statistics for fit's pass (``ctx``: ``methods.FitContext``): for a Gram
    method the noise sums and the training rows' permuted cross blocks; for a rows method none
    (its rows are all kept). Other methods: a one-line refusal."""
    if needs not in ("gram", "rows"):
        raise AffeqError("negative controls are fitted from the fit's own rows or Gram pass, "
                         "by the fit's own estimator",
                         "fit --controls with --method ols, ridge, orthogonal, low-rank, "
                         "prior-ridge or prior-pca")
    if ctx.heads is None:
        raise AffeqError("the noise control ties its clusters to the target's predicted class, "
                         "which needs the classifier heads",
                         "fit --controls from a feature store or images, not bare arrays")
    if needs == "rows":
        return {}
    pairs = control_pairs(ctx.names)
    real = real_networks(ctx.names)
    return {"controls_noise": NoiseCross(ctx.slices, ctx.mask, ctx.heads, pairs),
            "controls_shuffled": PermutedCross({m: ctx.slices[m] for m in real}, 1,
                                               mask=ctx.mask)}


def control_maps(ctx: Any, red: Mapping[str, Any], strat: Any) -> list[AffineMap]:
    """The noise and shuffled control maps of every ordered pair, from the pass's statistics
    (``strat``: the fit's ``methods.FitMethod``; a rows method: :func:`rows_control_maps`)."""
    if strat.needs == "rows":
        return rows_control_maps(ctx, red["rows"].all(), strat.name, strat.seed)
    g = red["gram"]
    out = []
    eig: dict[str, solvers.SourceEig] = {}
    shuffled = _Permuted(g.train, red["controls_shuffled"], 0)
    for a, t in control_pairs(ctx.names):
        out.append(noise_map(red["controls_noise"], a, t, g.train))
        if a not in eig:
            eig = {a: solvers.source_eig(g.train, ctx.slices[a])}
        w, b, st = solvers.ols(shuffled, ctx.slices[a], ctx.slices[t], eig=eig[a])
        st["control"] = "shuffled"
        out.append(AffineMap(control_name(a, "shuffled"), t, w.astype(np.float32),
                             b.astype(np.float32), "ols", st))
    return out


def _prior_control(a: str, t: str, kind: str, fit: partial[select.PriorFit],
                   rows: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
                   extra: Mapping[str, Any]) -> AffineMap:
    """One rows control map of a→t: ``fit`` (``select.prior_fit`` with the real pair's prior,
    method and seed) on control ``rows`` (A's rows, t's rows, groups, CV labels)."""
    xa, xt, groups, labels = rows
    w, b, st, _ = fit(xa, xt, groups, labels=labels)
    st.update(extra, control=kind)
    return AffineMap(control_name(a, kind), t, w.astype(np.float32), b.astype(np.float32),
                     str(fit.keywords["method"]), st)


def rows_control_maps(ctx: Any, rows: tuple[np.ndarray, np.ndarray], method: str, seed: int
                      ) -> list[AffineMap]:
    """A rows method's noise and shuffled control maps of every ordered pair (module docstring):
    ``rows`` the pass's kept rows and sample indices (``AllRows.all``), fitted as
    ``methods.PriorMethod`` fits the real pair (its training rows, groups, CV labels, prior,
    ``seed``) with A's rows replaced by noise rows, or the later network's rows permuted."""
    x, idx = rows
    train = ~ctx.mask[idx]
    x, idx = x[train], idx[train]
    g = None if ctx.groups is None else ctx.groups[idx]
    lab = None if ctx.labels is None else ctx.labels[idx]
    lab = select.cv_labels(lab)  # as PriorMethod.solve
    perm = chunk_permutation(0, 0, x.shape[0])  # the Gram's permutation 0 of one chunk at 0
    order, pv = {m: i for i, m in enumerate(ctx.names)}, ctx.head_pinvs
    out = []
    for a, t in control_pairs(ctx.names):
        prior = select.Prior.of(ctx.heads[a], ctx.heads[t], pv[t])
        xa, xt = x[:, ctx.slices[a]], x[:, ctx.slices[t]]
        cls = predicted(ctx.heads[t], xt)  # B's class on each training row: the noise's cluster
        counts = np.bincount(cls, minlength=ctx.heads[t].num_classes)
        mean = xa.mean(0, dtype=np.float64)
        scale = noise_scale(((xa - mean) ** 2).sum(0), xa.shape[0])
        fit = partial(select.prior_fit, prior=prior, method=method, seed=seed)
        out.append(_prior_control(a, t, "noise", fit,
                                  (noise_rows(a, t, idx, cls, mean, scale), xt, g, lab),
                                  noise_stats(a, t, counts, mean, scale)))
        if order[a] < order[t]:  # the target permuted: its truth (label) moves with it
            shuffled = (xa, xt[perm], g, None if lab is None else lab[perm])
        else:  # the source permuted: its group moves with it
            shuffled = (xa[perm], xt, None if g is None else g[perm], lab)
        out.append(_prior_control(a, t, "shuffled", fit, shuffled,
                                  {"permutation": "one of all training rows"}))
    return out


# ----------------------------------------------------------------------------------------------
# in evaluate's pass


def _entries(maps: MapSet, chosen: Sequence[str], columns: Sequence[str]
             ) -> list[tuple[str, str, str]]:
    """(kind, A, B) of every control the maps (and, for random weights, the store) hold: a kind is
    taken for a source when it covers every target."""
    out = []
    for a in chosen:
        for kind in KINDS:
            src = control_name(a, kind)
            if kind == "random" and src not in columns:
                continue
            targets = [t for t in chosen if t != a]
            if targets and all((src, t) in maps for t in targets):
                out += [(kind, a, t) for t in targets]
    return out


def control_entries(maps: MapSet, chosen: Sequence[str], columns: Sequence[str]
                    ) -> list[tuple[str, str, str]]:
    """:func:`_entries`, or the one-line refusal when there is none."""
    got = _entries(maps, chosen, columns)
    if not got:
        raise AffeqError("the maps file holds no control maps for these networks",
                         "fit the maps with --controls (noise and shuffled controls), or "
                         "extract NAME~random beside NAME (extract --models A,A~random) and fit "
                         "on that store for random-weight controls")
    return got


class ControlTally:
    """Each control hybrid's predicted class over a pass of store rows (a reducer of the pass
    engine): per entry (kind, A, B), B's head folded with the control map (float64) scored by
    ``core.evaluate_heads`` on the control source's rows: A's own features (shuffled), the store's
    ``A~random`` features (random weights), or noise drawn for the chunk's samples (noise)."""

    def __init__(self, maps: MapSet, heads: Mapping[str, Head], entries: Sequence[tuple],
                 labels: np.ndarray, device: str) -> None:
        self.maps, self.heads, self.entries = maps, dict(heads), [tuple(e) for e in entries]
        self.labels, self.device = labels, device
        self.start: int | None = None
        self.stop: int | None = None
        self.pred: list[np.ndarray] = []  # int32 [E, r] per chunk
        self._folded: list[Head] | None = None
        self._centres: dict[int, Centres] = {}

    def fresh(self) -> ControlTally:
        """An empty tally of the same configuration."""
        return ControlTally(self.maps, self.heads, self.entries, self.labels, self.device)

    def __getstate__(self) -> dict[str, Any]:
        """Only the configuration travels (folds and centres are rebuilt)."""
        if self.start is not None:
            raise InternalError("only a fresh ControlTally travels to a worker")
        return {"cfg": (self.maps, self.heads, self.entries, self.labels, self.device)}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(*st["cfg"])

    def _map(self, kind: str, a: str, t: str) -> AffineMap:
        return self.maps[(control_name(a, kind), t)]

    def folded(self) -> list[Head]:
        """Every entry's folded head (computed once per process)."""
        if self._folded is None:
            self._folded = [fold_head(self._map(k, a, t), self.heads[t])
                            for k, a, t in self.entries]
        return self._folded

    def _rows(self, c: Chunk, kind: str, a: str, t: str) -> np.ndarray:
        if kind == "shuffled":
            return c.columns[a]
        if kind == "random":
            return c.columns[control_name(a, "random")]
        st = self._map(kind, a, t).stats
        seed = int(st["noise_seed"])
        dim = len(st["noise_mean"])
        cen = self._centres.setdefault(seed, Centres(seed, dim))
        return eval_noise(st, dim, c.index, cen)

    def update(self, c: Chunk) -> None:
        """Score every control hybrid on the chunk."""
        labels = np.ascontiguousarray(self.labels[c.index])
        pred = np.empty((len(self.entries), labels.shape[0]), np.int32)
        for e, ((kind, a, t), h) in enumerate(zip(self.entries, self.folded(), strict=True)):
            x = self._rows(c, kind, a, t)
            if x.dtype not in (np.float16, np.float32) or not x.flags.c_contiguous:
                x = np.ascontiguousarray(x, dtype=np.float32)
            w, b = h.weight.astype(np.float32), h.bias.astype(np.float32)
            pred[e] = evaluate_heads(x, w[None], b[None], labels, device=self.device).pred[0]
        if self.stop is not None and c.start != self.stop:
            raise InternalError(f"control tally of samples up to {self.stop} got {c.start}")
        self.start = c.start if self.start is None else self.start
        self.stop = c.stop
        self.pred.append(pred)

    def merge(self, other: ControlTally) -> None:
        """Append the following samples' predictions."""
        if other.start is None:
            return
        if self.stop is not None and other.start != self.stop:
            raise InternalError(f"control tally up to {self.stop} got {other.start}")
        self.start = other.start if self.start is None else self.start
        self.stop = other.stop
        self.pred += other.pred

    def joined(self) -> np.ndarray:
        """Predictions ``[E, n]``."""
        if not self.pred:
            return np.zeros((len(self.entries), 0), np.int32)
        return np.concatenate(self.pred, axis=1)

    def state(self) -> State:
        """The predictions."""
        return {"start": self.start, "stop": self.stop, "pred": self.joined()}

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.start, self.stop = st["start"], st["stop"]
        self.pred = [np.asarray(st["pred"], np.int32)]


# ----------------------------------------------------------------------------------------------
# the result


@dataclass
class ControlTable:
    """Real hybrids against their controls, on the evaluation images.

    ``measure`` is ``top1`` (labelled) or ``agreement`` (with the target's own prediction);
    ``real`` [N, N] the hybrids' score in %; ``score[kind]`` the control hybrids' (NaN where absent,
    and on the diagonal); ``margin[kind]`` = real − control (points); ``beats[kind]`` whether the
    margin clears :data:`BEAT_SE` standard errors; ``chance[B]`` the best constant guess for target
    B (the most frequent label, or B's most frequent prediction) and ``beats_chance`` whether the
    hybrid clears it by the same rule (a hybrid below a guess that ignores the image shows no
    equivalence, whatever its controls score); ``flagged`` the hybrids A->B that do not beat every
    control present, or chance."""

    models: list[str]
    n: int
    measure: str
    real: np.ndarray
    score: dict[str, np.ndarray]
    chance: np.ndarray
    margin: dict[str, np.ndarray] = field(default_factory=dict)
    beats: dict[str, np.ndarray] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    beats_chance: np.ndarray | None = None
    # the hybrids A->B whose shuffled control is their own map (a rows method that kept the prior
    # on real and on mismatched pairs): that control cannot discriminate, so it is not counted
    same_map: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.margin:
            self.margin = {k: self.real - s for k, s in self.score.items()}
        if not self.beats:
            self.beats = {k: np.where(np.isfinite(s), clears(self.real, s, self.n), True)
                          for k, s in self.score.items()}
        if self.beats_chance is None:
            guess = np.broadcast_to(self.chance[None, :], self.real.shape)
            self.beats_chance = clears(self.real, guess, self.n)
        if not self.flagged:
            off = ~np.eye(len(self.models), dtype=bool)
            self.flagged = [f"{a}->{b}" for i, a in enumerate(self.models)
                            for j, b in enumerate(self.models)
                            if off[i, j] and not (all(bool(v[i, j]) for k, v in self.beats.items()
                                                      if not self.is_own_map(k, f"{a}->{b}"))
                                                  and bool(self.beats_chance[i, j]))]

    def is_own_map(self, kind: str, pair: str) -> bool:
        """Whether ``kind``'s control of ``pair`` ("A->B") is the hybrid's own map (not counted)."""
        return kind == "shuffled" and pair in self.same_map

    @property
    def kinds(self) -> list[str]:
        """The controls present, in display order."""
        return [k for k in KINDS if k in self.score]

    def line(self) -> str:
        """The one line the CLI prints (and what is missing: the random-weight control needs
        ``NAME~random`` features in the store)."""
        kinds = ", ".join(self.kinds)
        missing = ("" if "random" in self.kinds else
                   "; no random-weight control: extract NAME~random beside each NAME to add it")
        if not self.flagged:
            worst = min(float(np.nanmin(np.where(np.eye(len(self.models), dtype=bool), np.nan,
                                                 self.margin[k]))) for k in self.kinds)
            return (f"controls ({kinds}): every hybrid beats its controls and chance "
                    f"({self.measure}; smallest margin {worst:+.1f} points){missing}"
                    + self._same_note())
        return (f"controls ({kinds}): {len(self.flagged)} hybrid(s) do NOT beat their controls "
                "or chance: " + ", ".join(self.flagged[:6])
                + (" …" if len(self.flagged) > 6 else "") + missing + self._same_note())

    def _same_note(self) -> str:
        if not self.same_map:
            return ""
        return (f"; not counted: the shuffled control of {', '.join(self.same_map[:4])} is the "
                "hybrid's own map (the estimator kept its prior on real and on mismatched pairs)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN → None)."""
        def mat(a: np.ndarray) -> list[list[Any]]:
            return [[None if isinstance(v, float) and not math.isfinite(v) else v
                     for v in (row.tolist())] for row in a]

        return {"question": "is this equivalence real, and how large?", "n": self.n,
                "models": list(self.models), "measure": self.measure,
                "meanings": {k: MEANINGS[k] for k in self.kinds},
                "beat_rule": f"real - control > {BEAT_SE:g} standard errors of the difference",
                "real": mat(self.real), "chance": [float(v) for v in self.chance],
                "beats_chance": mat(self.beats_chance),
                "controls": {k: {"score": mat(self.score[k]), "margin": mat(self.margin[k]),
                                 "beats": mat(self.beats[k])} for k in self.kinds},
                "same_map": list(self.same_map),
                "flagged": list(self.flagged), "all_beat": not self.flagged}


def _se(real: np.ndarray, ctrl: np.ndarray, n: int) -> np.ndarray:
    """Standard error (points) of real − control for proportions over ``n`` images."""
    p, q = real / 100.0, ctrl / 100.0
    with np.errstate(invalid="ignore"):
        return 100.0 * np.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1))


def clears(real: Any, ctrl: Any, n: int) -> Any:
    """Whether real − control > :data:`BEAT_SE` standard errors (:func:`_se`), in points over
    ``n`` images: the one rule for beating a control or chance (arrays or scalars)."""
    return real - ctrl > BEAT_SE * _se(real, ctrl, n)


def best_guess(truth: np.ndarray) -> float:
    """Chance (%): how often the best constant guess, the most frequent known answer (≥ 0), is
    right over all of ``truth``'s rows (NaN without rows)."""
    n = len(truth)
    return 100.0 * float(np.bincount(truth[truth >= 0]).max()) / n if n else float("nan")


def same_map_pairs(maps: MapSet, entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """The pairs A->B whose shuffled control map is bit for bit the real map A->B (read on A's
    real features, it is the same hybrid; a rows method that kept its prior both times)."""
    out = []
    for kind, a, t in entries:
        key = (control_name(a, kind), t)
        if kind != "shuffled" or key not in maps or (a, t) not in maps:
            continue
        c, r = maps[key], maps[a, t]
        if np.array_equal(c.weight, r.weight) and np.array_equal(c.bias, r.bias):
            out.append(f"{a}->{t}")
    return out


def control_table(models: Sequence[str], entries: Sequence[tuple[str, str, str]],
                  pred: np.ndarray, own: np.ndarray, labels: np.ndarray | None,
                  real: np.ndarray, same_map: Sequence[str] = ()) -> ControlTable:
    """The :class:`ControlTable` from the controls' predictions ``[E, n]``, each network's own
    prediction ``own`` [N, n], the labels (None: agreement), the real hybrids' score [N, N] and
    the pairs whose shuffled control is their own map (:func:`same_map_pairs`)."""
    models = list(models)
    k, n = len(models), int(own.shape[1])
    score: dict[str, np.ndarray] = {}
    for e, (kind, a, t) in enumerate(entries):
        i, j = models.index(a), models.index(t)
        truth = labels if labels is not None else own[j]
        s = score.setdefault(kind, np.full((k, k), np.nan))
        s[i, j] = 100.0 * float((pred[e] == truth).mean()) if n else np.nan
    chance = np.zeros(k)
    for j in range(k):
        truth = labels if labels is not None else own[j]
        chance[j] = best_guess(truth)
    return ControlTable(models, n, "top1" if labels is not None else "agreement",
                        np.asarray(real, np.float64), score, chance, same_map=list(same_map))
