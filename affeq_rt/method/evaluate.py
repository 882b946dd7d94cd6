"""Cross-network evaluation: the N×N hybrid accuracy table, the paper's overlap analysis, agreement
scoring for unlabelled stores, and ``validate`` (each network's own accuracy against its spec).

For a source network A and a target network B the hybrid is C_B(M_{A→B} F_A(x)). Its classifier
is folded into the map in float64 (W_B·W_M, K×d_A; W_B·b_M + b_B) so that each source needs ONE
batched pass of the compiled evaluator (``core.evaluate_heads``) over its stored features with
every target's folded head stacked; no n×N×K logits are ever materialised.

Conventions (thesis Table 5.2 and the paper §4):
- ``top1[A, B]`` is the accuracy (%) of C_B on mapped F_A; the diagonal is each network unmapped.
- ``change_top1[A, B] = (top1[A, B] − top1[A, A]) / top1[A, A] · 100``: % change relative to the
  SOURCE network's own accuracy.
- ``loss[A, B] = Acc(C_A(F_A)) − Acc(C_A(M_{B→A} F_B)) = top1[A, A] − top1[B, A]`` in percentage
  points: what A's classifier loses when A's features are replaced by B's (negative = gain).
- TF-slim heads with 1001 classes (spec ``label_offset`` = 1) have their background row dropped
  before folding, so every head scores the same 1000 ImageNet classes and labels index them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.store import open_store

# Region names of the 3-set overlap (A's own, B's own, hybrid A→B), in display order.
REGIONS: tuple[str, ...] = ("A", "B", "H", "AB", "AH", "BH", "ABH", "none")


class StoreLike(Protocol):
    """What evaluation needs from a feature store (``store.FeatureStore`` or ``ArrayStore``)."""

    models: Sequence[str]
    n: int

    @property
    def labels(self) -> np.ndarray | None: ...
    def features(self, model: str) -> np.ndarray: ...
    def head(self, model: str) -> tuple[np.ndarray, np.ndarray]: ...
    def spec(self, model: str) -> dict: ...


@dataclass
class ArrayStore:
    """An in-memory stand-in for ``FeatureStore``: features, heads and specs held as arrays.

    ``features[m]`` is ``[n, d_m]``, ``heads[m]`` is ``(W [K, d_m], b [K])``, ``labels`` is
    int64 ``[n]`` with −1 for unknown (or None).
    """

    features_: dict[str, np.ndarray]
    heads_: dict[str, tuple[np.ndarray, np.ndarray]]
    labels_: np.ndarray | None = None
    specs_: dict[str, dict] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.features_)

    @property
    def n(self) -> int:
        return int(next(iter(self.features_.values())).shape[0]) if self.features_ else 0

    @property
    def labels(self) -> np.ndarray | None:
        if self.labels_ is None:
            return None
        lab = np.asarray(self.labels_, dtype=np.int64)
        return None if bool((lab < 0).all()) else lab

    def features(self, model: str) -> np.ndarray:
        return self.features_[model]

    def head(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        return self.heads_[model]

    def spec(self, model: str) -> dict:
        return self.specs_.get(model, {"name": model, "label_offset": 0})


@dataclass
class EvalTable:
    """The N×N result. Rows are sources (feature extractors), columns targets (classifiers)."""

    models: list[str]
    n: int
    labelled: bool
    top1: np.ndarray            # [N, N] % correct (NaN when unlabelled)
    top5: np.ndarray            # [N, N] % correct (NaN when unlabelled)
    agree: np.ndarray           # [N, N] % of images where C_B(M F_A) predicts as C_B(F_B)
    agree_unmapped: np.ndarray  # [N, N] % of images where C_A(F_A) and C_B(F_B) predict the same
    pred: np.ndarray            # [N, N, n] int32 top-1 class of the hybrid row→column
    correct: np.ndarray | None  # [N, N, ceil(n/8)] uint8, np.packbits of per-image top-1 hits
    pair_info: dict[str, dict] = field(default_factory=dict)  # "A->B" → map metadata (method, …)
    device: str = "cpu"
    seconds: float = 0.0
    label_offsets: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # fold_s (float64 folds), pass_s

    def index(self, model: str) -> int:
        """Row/column of ``model``, or an AffeqError naming the known models."""
        try:
            return self.models.index(model)
        except ValueError:
            raise AffeqError(f"network {model!r} is not in this table",
                             f"use one of {', '.join(self.models)}") from None

    @property
    def change_top1(self) -> np.ndarray:
        """% change of top-1 relative to the source's own accuracy (thesis Table 5.2)."""
        return _relative_change(self.top1)

    @property
    def change_top5(self) -> np.ndarray:
        """% change of top-5 relative to the source's own top-5."""
        return _relative_change(self.top5)

    @property
    def loss_top1(self) -> np.ndarray:
        """Paper's Loss_{A,B} = top1[A, A] − top1[B, A] in percentage points (negative = gain)."""
        own = np.diag(self.top1)
        return own[:, None] - self.top1.T

    def method(self, src: str, dst: str) -> str:
        """The fitting method of the map src→dst ("identity" on the diagonal)."""
        if src == dst:
            return "identity"
        return str(self.pair_info.get(f"{src}->{dst}", {}).get("method", "?"))

    def hits(self, src: str, dst: str) -> np.ndarray:
        """Boolean ``[n]``: was the hybrid src→dst right on each image (labelled stores only)."""
        if self.correct is None:
            raise AffeqError("this table has no labels, so no per-image correctness",
                             "evaluate a store with labels")
        return np.unpackbits(self.correct[self.index(src), self.index(dst)],
                             count=self.n).astype(bool)

    def off_diagonal_changes(self) -> np.ndarray:
        """The N·(N−1) % changes of all hybrids (for median / worst summaries)."""
        mask = ~np.eye(len(self.models), dtype=bool)
        return self.change_top1[mask]

    def summary(self) -> dict[str, float]:
        """Median and worst % change over all hybrids (labelled) or agreement (unlabelled)."""
        mask = ~np.eye(len(self.models), dtype=bool)
        if len(self.models) < 2:
            return {}
        if self.labelled:
            ch = self.change_top1[mask]
            return {"median_change_top1": float(np.median(ch)),
                    "worst_change_top1": float(ch.min()), "best_change_top1": float(ch.max())}
        ag = self.agree[mask]
        return {"median_agreement": float(np.median(ag)), "worst_agreement": float(ag.min()),
                "median_agreement_unmapped": float(np.median(self.agree_unmapped[mask]))}

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-ready (NaN → None)."""
        def mat(a: np.ndarray) -> list[list[float | None]]:
            return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in a]

        out: dict[str, Any] = {
            "models": list(self.models), "n": self.n, "labelled": self.labelled,
            "conventions": {
                "rows": "source (feature extractor)", "columns": "target (classifier)",
                "change": "(acc[A,B] - acc[A,A]) / acc[A,A] * 100, relative to the source",
                "loss_top1": "Loss_{A,B} = top1[A,A] - top1[B,A] in points; negative = gain",
                "agree": "% images where C_B(M F_A) predicts what C_B(F_B) predicts",
                "agree_unmapped": "% images where C_A(F_A) and C_B(F_B) predict the same class",
            },
            "agree": mat(self.agree), "agree_unmapped": mat(self.agree_unmapped),
            "methods": [[self.method(a, b) for b in self.models] for a in self.models],
            "pairs": self.pair_info, "label_offsets": self.label_offsets,
            "device": self.device, "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "summary": self.summary(),
        }
        if self.labelled:
            out.update(top1=mat(self.top1), top5=mat(self.top5),
                       change_top1=mat(self.change_top1), change_top5=mat(self.change_top5),
                       loss_top1=mat(self.loss_top1))
        return out


@dataclass
class Overlap:
    """The paper's Fig. 5 for one pair: who gets which images right.

    Sets: A = C_A(F_A) right, B = C_B(F_B) right, H = hybrid C_B(M_{A→B} F_A) right.
    ``regions[r]`` counts images in exactly the sets named by r ("none": in none of them).
    """

    a: str
    b: str
    n: int
    regions: dict[str, int]

    def _count(self, pred: Callable[[str], bool]) -> int:
        return sum(v for k, v in self.regions.items() if pred("" if k == "none" else k))

    @property
    def right_a(self) -> int:
        return self._count(lambda r: "A" in r)

    @property
    def right_b(self) -> int:
        return self._count(lambda r: "B" in r)

    @property
    def right_hybrid(self) -> int:
        return self._count(lambda r: "H" in r)

    @property
    def fixed(self) -> int:
        """Right for the hybrid but wrong with B's own features."""
        return self._count(lambda r: "H" in r and "B" not in r)

    @property
    def fixed_a_right(self) -> int:
        """Of ``fixed``, those A also gets right (the paper's yellow region)."""
        return self.regions["AH"]

    @property
    def broken(self) -> int:
        """Right with B's own features but wrong for the hybrid."""
        return self._count(lambda r: "B" in r and "H" not in r)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "hybrid": f"{self.a}->{self.b}", "n": self.n,
                "regions": dict(self.regions), "right_a": self.right_a, "right_b": self.right_b,
                "right_hybrid": self.right_hybrid, "wrong_b": self.n - self.right_b,
                "fixed": self.fixed, "fixed_a_right": self.fixed_a_right, "broken": self.broken}


@dataclass
class ValidationRow:
    """One network's own accuracy next to what its spec expects."""

    model: str
    n: int
    top1: float
    top5: float
    expected_top1: float | None
    tolerance: float  # points; the larger of the fixed tolerance and 3 binomial standard errors

    @property
    def delta(self) -> float | None:
        return None if self.expected_top1 is None else self.top1 - self.expected_top1

    @property
    def ok(self) -> bool | None:
        return None if self.delta is None else abs(self.delta) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "n": self.n, "top1": self.top1, "top5": self.top5,
                "expected_top1": self.expected_top1, "delta": self.delta,
                "tolerance": self.tolerance, "ok": self.ok}


# ----------------------------------------------------------------------------------------------
# inputs


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def load_pairs(maps: Any) -> tuple[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
                                   dict[str, dict]]:
    """Normalise maps to ``{(src, dst): (W [d_dst, d_src], b [d_dst])}`` plus per-pair metadata.

    ``maps`` is a maps file path (read with ``maps.load_maps``), a list of ``AffineMap``, or a
    mapping keyed by ``"src->dst"`` or ``(src, dst)`` whose values are ``AffineMap``-like
    (``weight``/``bias``) or ``(W, b)`` tuples.
    """
    if isinstance(maps, (str, Path)):
        from affeq_rt.io.maps import load_maps

        maps = load_maps(maps)
    if isinstance(maps, Mapping):
        items = list(maps.items())
    elif isinstance(maps, Sequence):  # e.g. fit.fit_maps(...): a list of AffineMap
        items = [((m.src, m.dst), m) for m in maps]
    else:
        raise AffeqError(f"cannot read maps from a {type(maps).__name__}",
                         "pass a maps file, a MapSet, or a list of AffineMap")
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    info: dict[str, dict] = {}
    for key, m in items:
        src, dst = key.split("->", 1) if isinstance(key, str) else key
        if isinstance(m, tuple):
            w, b = m[0], m[1]
            meta: dict = {}
        else:
            w, b = m.weight, m.bias
            meta = {"method": getattr(m, "method", "?"), **dict(getattr(m, "stats", None) or {})}
        pairs[(src, dst)] = (_as_array(w), _as_array(b))
        info[f"{src}->{dst}"] = {k: v for k, v in meta.items()
                                 if isinstance(v, (str, int, float, bool)) or v is None}
    return pairs, info


def own_head(store: StoreLike, model: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(W [K, d], b [K], label_offset)`` with the TF-slim background row dropped."""
    w, b = store.head(model)
    w, b = _as_array(w), _as_array(b)
    try:
        spec = store.spec(model) or {}
    except (KeyError, AttributeError, FileNotFoundError):
        spec = {}
    offset = int(spec.get("label_offset", 0) or 0)
    if offset:
        w, b = w[offset:], b[offset:]
    return w, b, offset


def _check_inputs(store: StoreLike, pairs: Mapping[tuple[str, str], Any],
                  models: Sequence[str] | None) -> list[str]:
    """The evaluated models, after checking that the maps cover them (clear errors otherwise)."""
    in_store = list(store.models)
    if not in_store:
        raise AffeqError("the feature store holds no networks", "extract features first")
    if models:
        unknown = [m for m in models if m not in in_store]
        if unknown:
            raise AffeqError(f"network(s) {', '.join(unknown)} are not in the feature store",
                             f"choose from {', '.join(in_store)}")
        chosen = list(dict.fromkeys(models))
    else:
        chosen = in_store
    in_maps = {m for pair in pairs for m in pair}
    if len(chosen) > 1 and not in_maps & set(chosen):
        raise AffeqError(
            f"the maps are for networks {', '.join(sorted(in_maps)) or '(none)'} but the store "
            f"holds {', '.join(in_store)}: different network sets",
            "fit maps on features of the same networks (affeq-rt fit) or pass matching files")
    missing_nets = [m for m in chosen if m not in in_maps] if len(chosen) > 1 else []
    if missing_nets:
        raise AffeqError(f"network(s) {', '.join(missing_nets)} have no maps in the maps file",
                         "refit the maps with them included, or restrict --models to those mapped")
    missing = [f"{a}->{b}" for a in chosen for b in chosen if a != b and (a, b) not in pairs]
    if missing:
        more = f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""
        shown = ", ".join(missing[:6]) + more
        raise AffeqError(f"the maps file lacks pair(s) {shown}",
                         "refit with all pairs, or restrict --models to a fully mapped set")
    return chosen


# ----------------------------------------------------------------------------------------------
# the table


def _stacked_heads(src: str, chosen: Sequence[str], heads: Mapping[str, tuple],
                   pairs: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]],
                   d_src: int) -> tuple[np.ndarray, np.ndarray]:
    """Every target's head folded for source ``src`` (float64 products, ``maps.fold_head``), stacked
    as W ``[T, K, d_src]``, b ``[T, K]`` float32."""
    from affeq_rt.io.maps import AffineMap, fold_head

    k = heads[chosen[0]][0].shape[0]
    w_all = np.empty((len(chosen), k, d_src), dtype=np.float32)
    b_all = np.empty((len(chosen), k), dtype=np.float32)
    for t, dst in enumerate(chosen):
        w_dst, b_dst, _ = heads[dst]
        if dst == src:
            w_all[t], b_all[t] = w_dst, b_dst
            continue
        map_w, map_b = pairs[(src, dst)]
        if map_w.shape != (w_dst.shape[1], d_src) or map_b.shape != (w_dst.shape[1],):
            raise AffeqError(
                f"map {src}->{dst} has shape {tuple(map_w.shape)} but the store's features need "
                f"({w_dst.shape[1]}, {d_src})",
                "the maps were fitted on other networks; refit them")
        w_all[t], b_all[t] = fold_head(AffineMap(src, dst, map_w, map_b, ""), w_dst, b_dst)
    return w_all, b_all


def _run_heads(x: np.ndarray, w: np.ndarray, b: np.ndarray, labels: np.ndarray,
               device: str) -> Any:
    """One compiled pass of ``core.evaluate_heads`` (float16/float32 features as stored)."""
    from affeq_rt.core.gram import evaluate_heads

    if x.dtype not in (np.float16, np.float32) or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return evaluate_heads(x, w, b, labels, device=device)


def evaluate(store: StoreLike | str | Path, maps: Any, out: str | Path | None = None,
             device: str = "auto", models: Sequence[str] | None = None,
             overlap_pairs: Iterable[tuple[str, str]] | None = None,
             progress: Callable[[str], None] | None = None, title: str | None = None,
             notes: Sequence[str] = ()) -> EvalTable:
    """The N×N table of a store under a set of maps; with ``out``, also write the full report.

    One compiled pass per source network with all targets' folded heads stacked. Without labels
    the table holds agreement only (how often the hybrid predicts what the target predicts).
    """
    from affeq_rt.core.backends import resolve_device

    t0 = time.perf_counter()
    st = open_store(store)
    pairs, info = load_pairs(maps)
    chosen = _check_inputs(st, pairs, models)
    dev = resolve_device(device)
    heads = {m: own_head(st, m) for m in chosen}
    ks = {m: h[0].shape[0] for m, h in heads.items()}
    if len(set(ks.values())) > 1:
        raise AffeqError(f"the networks score different numbers of classes ({ks}) after dropping "
                         "TF-slim background rows", "check each spec's num_classes/label_offset")
    labels = st.labels
    labelled = labels is not None
    n = int(st.n)
    if labelled:
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise AffeqError(f"store labels have shape {labels.shape}, expected ({n},)",
                             "the store is corrupt; re-extract it")
        if (labels < 0).any():
            raise AffeqError(f"{int((labels < 0).sum())} of {n} store images have no label",
                             "evaluate a fully labelled store, or one without labels (agreement)")
    run_labels = labels if labelled else np.full(n, -1, dtype=np.int64)  # -1: unknown, never a hit
    nn = len(chosen)
    top1 = np.full((nn, nn), np.nan)
    top5 = np.full((nn, nn), np.nan)
    pred = np.empty((nn, nn, n), dtype=np.int32)
    correct = np.empty((nn, nn, (n + 7) // 8), dtype=np.uint8) if labelled else None
    timings = {"fold_s": 0.0, "pass_s": 0.0}
    for i, src in enumerate(chosen):
        if progress:
            progress(src)
        x = st.features(src)
        if x.ndim != 2 or x.shape[0] != n:
            raise AffeqError(f"features of {src} have shape {x.shape}, expected ({n}, d)",
                             "the store is corrupt; re-extract it")
        if x.shape[1] != heads[src][0].shape[1]:
            raise AffeqError(f"{src}: features have {x.shape[1]} dims but its head expects "
                             f"{heads[src][0].shape[1]}", "re-extract the store")
        t1 = time.perf_counter()
        w_all, b_all = _stacked_heads(src, chosen, heads, pairs, x.shape[1])
        t2 = time.perf_counter()
        res = _run_heads(x, w_all, b_all, run_labels, dev)
        timings["fold_s"] += t2 - t1
        timings["pass_s"] += time.perf_counter() - t2
        pred[i] = res.pred
        if labelled:
            top1[i] = 100.0 * np.asarray(res.top1, dtype=np.float64) / n
            top5[i] = 100.0 * np.asarray(res.top5, dtype=np.float64) / n
            correct[i] = res.correct
    own = pred[np.arange(nn), np.arange(nn)]             # [N, n]: each network's own prediction
    agree = 100.0 * (pred == own[None, :, :]).mean(axis=2) if n else np.full((nn, nn), np.nan)
    agree_unmapped = 100.0 * (own[:, None, :] == own[None, :, :]).mean(axis=2) if n else agree
    pair_info = {f"{a}->{b}": info.get(f"{a}->{b}", {}) for a in chosen for b in chosen if a != b}
    table = EvalTable(models=list(chosen), n=n, labelled=labelled, top1=top1, top5=top5,
                      agree=agree, agree_unmapped=agree_unmapped, pred=pred, correct=correct,
                      pair_info=pair_info, device=dev, seconds=time.perf_counter() - t0,
                      label_offsets={m: heads[m][2] for m in chosen}, timings=timings)
    if out is not None:
        from affeq_rt.report.write import write_report

        write_report(table, out, overlap_pairs=overlap_pairs, title=title, notes=notes)
    return table


# ----------------------------------------------------------------------------------------------
# overlap and validate


def overlap(table: EvalTable, a: str, b: str) -> Overlap:
    """Fig. 5 of the paper for hybrid a→b: the 7 regions of {A right, B right, hybrid right}."""
    if a == b:
        raise AffeqError(f"overlap needs two different networks, got {a} twice", "pick a pair")
    ra, rb, rh = table.hits(a, a), table.hits(b, b), table.hits(a, b)
    code = ra.astype(np.int8) | (rb.astype(np.int8) << 1) | (rh.astype(np.int8) << 2)
    counts = np.bincount(code, minlength=8)
    names = {"none": 0, "A": 1, "B": 2, "AB": 3, "H": 4, "AH": 5, "BH": 6, "ABH": 7}
    return Overlap(a=a, b=b, n=table.n, regions={r: int(counts[names[r]]) for r in REGIONS})


def default_overlap_pairs(table: EvalTable, limit: int = 2) -> list[tuple[str, str]]:
    """The paper's choice: the two most accurate networks, both directions."""
    if not table.labelled or len(table.models) < 2:
        return []
    order = np.argsort(-np.diag(table.top1), kind="stable")
    a, b = table.models[order[0]], table.models[order[1]]
    return [(a, b), (b, a)][:limit]


def validate(store: StoreLike | str | Path, device: str = "auto", tolerance: float = 1.0,
             models: Sequence[str] | None = None) -> list[ValidationRow]:
    """Each network's own top-1/top-5 on the store next to its spec's ``expected_top1``.

    A row is flagged (``ok`` False) when the gap exceeds ``tolerance`` points or three binomial
    standard errors of the measured accuracy, whichever is larger (small stores are noisy).
    """
    from affeq_rt.core.backends import resolve_device

    st = open_store(store)
    labels = st.labels
    if labels is None:
        raise AffeqError("the feature store has no labels, so accuracy cannot be measured",
                         "extract a labelled split (e.g. ImageNet val with its labels)")
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    dev = resolve_device(device)
    chosen = list(models) if models else list(st.models)
    rows = []
    n = int(st.n)
    for m in chosen:
        if m not in st.models:
            raise AffeqError(f"network {m!r} is not in the feature store",
                             f"choose from {', '.join(st.models)}")
        w, b, _ = own_head(st, m)
        res = _run_heads(st.features(m), w[None].astype(np.float32), b[None].astype(np.float32),
                         labels, dev)
        top1 = 100.0 * float(res.top1[0]) / n
        top5 = 100.0 * float(res.top5[0]) / n
        try:
            spec = st.spec(m) or {}
        except (KeyError, AttributeError, FileNotFoundError):
            spec = {}
        exp = spec.get("expected_top1")
        ref = float(exp) if exp is not None else top1
        se = 100.0 * math.sqrt(max(ref, 0.0) / 100.0 * (1.0 - min(ref, 100.0) / 100.0) / max(n, 1))
        rows.append(ValidationRow(model=m, n=n, top1=top1, top5=top5,
                                  expected_top1=None if exp is None else float(exp),
                                  tolerance=max(tolerance, 3.0 * se)))
    return rows


def _relative_change(acc: np.ndarray) -> np.ndarray:
    own = np.diag(acc)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(own > 0, (acc - own) / own * 100.0, np.nan)
