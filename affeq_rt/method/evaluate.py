"""Cross-network evaluation: the N×N hybrid accuracy table (with the paper's overlap analysis
for chosen pairs), agreement scoring for unlabelled stores, and ``validate`` (each network's own
accuracy against its spec). Computes results; writes nothing (``report.write_report`` does).

For a source network A and a target network B the hybrid is C_B(M_{A→B} F_A(x)). Its classifier
is folded into the map in float64 (W_B·W_M, K×d_A; W_B·b_M + b_B) so that each source needs ONE
batched pass of the compiled evaluator (``core.evaluate_heads``) over its stored features with
every target's folded head stacked; no n×N×K logits are ever materialised. Heads come from the
store as ``io.heads.Head`` with TF-slim background rows already stripped, so every head scores
the same ImageNet classes and labels index them. Conventions: ``method.results``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from affeq_rt.core.backends import resolve_device
from affeq_rt.core.evaluate import HeadsResult, evaluate_heads
from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import MapSet, fold_head, load_maps
from affeq_rt.io.store import StoreLike, open_store
from affeq_rt.method.executor import Executor
from affeq_rt.method.overlap import default_overlap_pairs, overlap
from affeq_rt.method.results import EvalTable, ValidationRow
from affeq_rt.progress import Progress, or_silent

# ----------------------------------------------------------------------------------------------
# inputs


def as_mapset(maps: MapSet | str | os.PathLike) -> MapSet:
    """A :class:`MapSet` as given, or the one read from a maps file."""
    if isinstance(maps, MapSet):
        return maps
    if isinstance(maps, (str, os.PathLike)):
        return load_maps(maps)
    raise AffeqError(f"cannot read maps from a {type(maps).__name__}",
                     "pass a maps file or a MapSet (e.g. fit(...).maps)")


def _pair_info(maps: MapSet, chosen: Sequence[str]) -> dict[str, dict]:
    """Each evaluated pair's fit metadata (method and scalar stats) for the tables."""
    info = {}
    for a in chosen:
        for b in chosen:
            if a != b:
                m = maps[(a, b)]
                meta = {"method": m.method, **m.stats}
                info[f"{a}->{b}"] = {k: v for k, v in meta.items()
                                     if isinstance(v, (str, int, float, bool)) or v is None}
    return info


def _check_inputs(store: StoreLike, pairs: MapSet,
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


def _stacked_heads(src: str, chosen: Sequence[str], heads: Mapping[str, Head], maps: MapSet,
                   d_src: int) -> tuple[np.ndarray, np.ndarray]:
    """Every target's head folded for source ``src`` (float64 products, ``maps.fold_head``), stacked
    as W ``[T, K, d_src]``, b ``[T, K]`` float32."""
    k = heads[chosen[0]].num_classes
    w_all = np.empty((len(chosen), k, d_src), dtype=np.float32)
    b_all = np.empty((len(chosen), k), dtype=np.float32)
    for t, dst in enumerate(chosen):
        h = heads[dst]
        if dst == src:
            w_all[t], b_all[t] = h.weight, h.bias
            continue
        m = maps[(src, dst)]
        if m.weight.shape != (h.dim, d_src) or m.bias.shape != (h.dim,):
            raise AffeqError(
                f"map {src}->{dst} has shape {tuple(m.weight.shape)} but the store's features need "
                f"({h.dim}, {d_src})", "the maps were fitted on other networks; refit them")
        w_all[t], b_all[t] = fold_head(m, h.weight, h.bias)
    return w_all, b_all


def _run_heads(x: np.ndarray, w: np.ndarray, b: np.ndarray, labels: np.ndarray,
               device: str) -> HeadsResult:
    """One compiled pass of ``core.evaluate_heads`` (float16/float32 features as stored)."""
    if x.dtype not in (np.float16, np.float32) or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return evaluate_heads(x, w, b, labels, device=device)


def source_pass(st: StoreLike, src: str, chosen: Sequence[str], heads: Mapping[str, Head],
                maps: MapSet, labels: np.ndarray, device: str) -> tuple[HeadsResult, float, float]:
    """One source's compiled pass with every target's folded head: (result, fold s, pass s)."""
    n = int(st.n)
    x = st.features(src)
    if x.ndim != 2 or x.shape[0] != n:
        raise AffeqError(f"features of {src} have shape {x.shape}, expected ({n}, d)",
                         "the store is corrupt; re-extract it")
    if x.shape[1] != heads[src].dim:
        raise AffeqError(f"{src}: features have {x.shape[1]} dims but its head expects "
                         f"{heads[src].dim}", "re-extract the store")
    t1 = time.perf_counter()
    w_all, b_all = _stacked_heads(src, chosen, heads, maps, x.shape[1])
    t2 = time.perf_counter()
    res = _run_heads(x, w_all, b_all, labels, device)
    return res, t2 - t1, time.perf_counter() - t2


def pass_labels(st: StoreLike) -> np.ndarray:
    """The labels a pass scores against: the store's (checked), or −1 (never a hit) when none."""
    labels = _labels(st)
    return labels if labels is not None else np.full(int(st.n), -1, dtype=np.int64)


def _labels(st: StoreLike) -> np.ndarray | None:
    """The store's labels, checked: None (agreement only) or all known."""
    labels, n = st.labels, int(st.n)
    if labels is None:
        return None
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise AffeqError(f"store labels have shape {labels.shape}, expected ({n},)",
                         "the store is corrupt; re-extract it")
    if (labels < 0).any():
        raise AffeqError(f"{int((labels < 0).sum())} of {n} store images have no label",
                         "evaluate a fully labelled store, or one without labels (agreement)")
    return labels


def evaluate(store: StoreLike | str | os.PathLike, maps: MapSet | str | os.PathLike, *,
             device: str = "auto", models: Sequence[str] | None = None,
             overlap_pairs: Iterable[tuple[str, str]] | None = None,
             progress: Progress | None = None, executor: Executor | None = None) -> EvalTable:
    """The N×N table of a store under a set of maps, with the overlaps of ``overlap_pairs``
    (default: the two most accurate networks both ways; none without labels). Writes nothing.

    One compiled pass per source network with all targets' folded heads stacked. Without labels
    the table holds agreement only (how often the hybrid predicts what the target predicts).
    ``progress`` counts sources. ``executor`` (None: this process) runs the per-source passes
    elsewhere, e.g. ``affeq_rt.dist.RayExecutor``; the table is the same.
    """
    t0 = time.perf_counter()
    st = open_store(store)
    ms = as_mapset(maps)
    chosen = _check_inputs(st, ms, models)
    dev = resolve_device(device)
    heads = {m: st.head(m) for m in chosen}
    ks = {m: h.num_classes for m, h in heads.items()}
    if len(set(ks.values())) > 1:
        raise AffeqError(f"the networks score different numbers of classes ({ks}) after dropping "
                         "TF-slim background rows", "check each spec's num_classes/label_offset")
    labels = _labels(st)
    labelled = labels is not None
    n = int(st.n)
    run_labels = labels if labelled else np.full(n, -1, dtype=np.int64)  # -1: unknown, never a hit
    nn = len(chosen)
    top1 = np.full((nn, nn), np.nan)
    top5 = np.full((nn, nn), np.nan)
    pred = np.empty((nn, nn, n), dtype=np.int32)
    correct = np.empty((nn, nn, (n + 7) // 8), dtype=np.uint8) if labelled else None
    timings = {"fold_s": 0.0, "pass_s": 0.0}
    bar = or_silent(progress)
    bar.start("evaluate", total=nn, unit="source")
    if executor is None:
        results = []
        for src in chosen:
            res, fold_s, pass_s = source_pass(st, src, chosen, heads, ms, run_labels, dev)
            timings["fold_s"] += fold_s
            timings["pass_s"] += pass_s
            results.append(res)
            bar.advance(1)
    else:  # sources spread over the executor's workers; the same pass per source
        results = executor.evaluate_sources(st, ms, chosen, dev, bar)
    for i, res in enumerate(results):
        pred[i] = res.pred
        if labelled:
            top1[i] = 100.0 * np.asarray(res.top1, dtype=np.float64) / n
            top5[i] = 100.0 * np.asarray(res.top5, dtype=np.float64) / n
            correct[i] = res.correct
    bar.done()
    own = pred[np.arange(nn), np.arange(nn)]             # [N, n]: each network's own prediction
    agree = 100.0 * (pred == own[None, :, :]).mean(axis=2) if n else np.full((nn, nn), np.nan)
    agree_unmapped = 100.0 * (own[:, None, :] == own[None, :, :]).mean(axis=2) if n else agree
    table = EvalTable(models=list(chosen), n=n, labelled=labelled, top1=top1, top5=top5,
                      agree=agree, agree_unmapped=agree_unmapped, pred=pred, correct=correct,
                      pair_info=_pair_info(ms, chosen), device=dev,
                      seconds=time.perf_counter() - t0,
                      label_offsets={m: heads[m].label_offset for m in chosen}, timings=timings)
    if labelled:
        pairs = (default_overlap_pairs(table) if overlap_pairs is None else list(overlap_pairs))
        table.overlaps = [overlap(table, a, b) for a, b in pairs]
    return table


# ----------------------------------------------------------------------------------------------
# validate


def validate(store: StoreLike | str | os.PathLike, device: str = "auto", tolerance: float = 1.0,
             models: Sequence[str] | None = None) -> list[ValidationRow]:
    """Each network's own top-1/top-5 on the store next to its spec's ``expected_top1``.

    A row is flagged (``ok`` False) when the gap exceeds ``tolerance`` points or three binomial
    standard errors of the measured accuracy, whichever is larger (small stores are noisy).
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise AffeqError(f"--tolerance must be a number of top-1 points ≥ 0, got {tolerance}",
                         "pass e.g. --tolerance 1")
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
        head = st.head(m)
        res = _run_heads(st.features(m), head.weight[None], head.bias[None], labels, dev)
        top1 = 100.0 * float(res.top1[0]) / n
        top5 = 100.0 * float(res.top5[0]) / n
        exp = st.spec(m).get("expected_top1")
        ref = float(exp) if exp is not None else top1
        se = 100.0 * math.sqrt(max(ref, 0.0) / 100.0 * (1.0 - min(ref, 100.0) / 100.0) / max(n, 1))
        rows.append(ValidationRow(model=m, n=n, top1=top1, top5=top5,
                                  expected_top1=None if exp is None else float(exp),
                                  tolerance=max(tolerance, 3.0 * se)))
    return rows
