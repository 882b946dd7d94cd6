"""Cross-network evaluation: the N×N hybrid accuracy table (with the paper's overlap analysis
for chosen pairs), agreement scoring for unlabelled stores, and ``validate`` (each network's own
accuracy against its spec). Computes results; writes nothing (``report.write_report`` does).

For a source network A and a target network B the hybrid is C_B(M_{A→B} F_A(x)). Its classifier
is folded into the map in float64 (W_B·W_M, K×d_A; W_B·b_M + b_B) so that each source is scored by
the compiled evaluator (``core.evaluate_heads``) on its stored features with every target's folded
head stacked; no n×N×K logits are ever materialised. The table is one pass of the engine
(``engine.run_pass``) over the store's rows feeding :class:`HeadTally`, here or on a cluster.
Heads come from the store as ``io.heads.Head`` with TF-slim background rows already stripped, so
every head scores the same ImageNet classes and labels index them. Conventions: ``method.results``.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.backends import resolve_device
from affeq_rt.core.evaluate import HeadsResult, evaluate_heads
from affeq_rt.engine import Chunk, Executor, run_pass
from affeq_rt.engine.reducer import State
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import MapSet, fold_head, load_maps
from affeq_rt.io.store import StoreLike, open_store
from affeq_rt.method.controls import (
    ControlTally,
    control_entries,
    control_name,
    control_table,
    real_networks,
    same_map_pairs,
)
from affeq_rt.method.overlap import default_overlap_pairs, overlap
from affeq_rt.method.results import EvalTable, ValidationRow
from affeq_rt.method.rows import StoreSource
from affeq_rt.progress import Progress

# Rows per compiled call: each call stacks (and on CUDA uploads) every target's folded head for a
# source once, so chunks are large (one call per source up to 65,536 images, as before the engine;
# an executor's own shard size, if smaller, sets them).
EVAL_CHUNK = 1 << 16

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
        folded = fold_head(m, h)
        w_all[t], b_all[t] = folded.weight, folded.bias
    return w_all, b_all


def _run_heads(x: np.ndarray, w: np.ndarray, b: np.ndarray, labels: np.ndarray,
               device: str) -> HeadsResult:
    """One compiled pass of ``core.evaluate_heads`` (float16/float32 features as stored)."""
    if x.dtype not in (np.float16, np.float32) or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return evaluate_heads(x, w, b, labels, device=device)


def _check_features(st: StoreLike, src: str, head: Head) -> None:
    """AffeqError when the store's features of ``src`` do not fit its head (or the store)."""
    n = int(st.n)
    x = st.features(src)
    if x.ndim != 2 or x.shape[0] != n:
        raise AffeqError(f"features of {src} have shape {x.shape}, expected ({n}, d)",
                         "the store is corrupt; re-extract it")
    if x.shape[1] != head.dim:
        raise AffeqError(f"{src}: features have {x.shape[1]} dims but its head expects "
                         f"{head.dim}", "re-extract the store")


# this process's inputs of the tally being run: {key: (folded heads per source, labels)}
_CACHE: dict[str, tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]] = {}


class HeadTally:
    """The N×N table's counts over a pass of store rows: a reducer of the pass engine.

    Per chunk, for each source network (``chosen`` order) every target's head folded with the
    source→target map (the source's own head for itself) is scored on the source's stored features
    by ``core.evaluate_heads`` (float16 rows fed as float16): top-1/top-5 hits summed ``[S, T]``,
    each image's predicted class ``[S, T, rows]`` int32 and top-1 correctness kept unpacked (bool),
    so shard edges need not fall on bytes. Labels are the store's (−1 without: never a hit).
    The stacked folded heads and the labels are read once per process, on first use, and cached
    under this tally's key (shared by its :meth:`fresh` copies). Pickled, a tally carries its
    configuration only: the maps file's path when the :class:`MapSet` has one (else the MapSet) and
    the store (a ``FeatureStore`` pickles as its path and manifest).
    """

    def __init__(self, maps: MapSet | str | os.PathLike, store: StoreLike, chosen: Sequence[str],
                 device: str, key: str | None = None) -> None:
        self.maps = maps
        self.store = store
        self.chosen = list(chosen)
        self.device = device
        self.key = key or uuid.uuid4().hex
        k = len(self.chosen)
        self.start: int | None = None  # the samples covered, start…stop (None: none yet)
        self.stop: int | None = None
        self.top1 = np.zeros((k, k), np.int64)
        self.top5 = np.zeros((k, k), np.int64)
        self.pred: list[np.ndarray] = []  # int32 [S, T, r] per chunk or merged shard
        self.bits: list[np.ndarray] = []  # bool [S, T, r]
        self.fold_s = 0.0
        self.pass_s = 0.0

    def _config(self) -> tuple:
        return self.maps, self.store, self.chosen, self.device, self.key

    def fresh(self) -> HeadTally:
        """An empty tally of the same configuration (and cache key)."""
        return HeadTally(*self._config())

    def __getstate__(self) -> dict[str, Any]:
        """Only the configuration travels (the maps file's path when there is one)."""
        if self.start is not None:
            raise InternalError("only a fresh HeadTally travels to a worker")
        maps = self.maps
        if isinstance(maps, MapSet) and maps.path:
            maps = str(Path(maps.path).resolve())
        return {"cfg": (maps, *self._config()[1:])}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(*st["cfg"])

    def inputs(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """(each source's stacked folded heads W ``[T, K, d]``, b ``[T, K]``; the labels ``[n]``),
        read and folded on first use in this process."""
        got = _CACHE.get(self.key)
        if got is None:
            t = time.perf_counter()
            ms = as_mapset(self.maps)
            heads = {m: self.store.head(m) for m in self.chosen}
            folded = {s: _stacked_heads(s, self.chosen, heads, ms, heads[s].dim)
                      for s in self.chosen}
            got = (folded, _run_labels(self.store))
            _CACHE.clear()
            _CACHE[self.key] = got
            self.fold_s += time.perf_counter() - t
        return got

    def release(self) -> None:
        """Drop this process's cached folded heads and labels."""
        _CACHE.pop(self.key, None)

    def _extend(self, start: int, stop: int) -> None:
        if self.stop is not None and start != self.stop:
            raise InternalError(f"tally of samples {self.start}–{self.stop} got {start}–{stop}")
        self.start = start if self.start is None else self.start
        self.stop = stop

    def update(self, chunk: Chunk) -> None:
        """Score every source's stacked folded heads on the chunk's rows."""
        folded, all_labels = self.inputs()
        t = time.perf_counter()
        labels = np.ascontiguousarray(all_labels[chunk.index])
        k, r = len(self.chosen), labels.shape[0]
        pred = np.empty((k, k, r), np.int32)
        bits = np.empty((k, k, r), bool)
        for i, src in enumerate(self.chosen):
            res = _run_heads(chunk.columns[src], *folded[src], labels, self.device)
            self.top1[i] += res.top1
            self.top5[i] += res.top5
            pred[i] = res.pred
            bits[i] = res.correct_bits()
        self.pred.append(pred)
        self.bits.append(bits)
        self._extend(chunk.start, chunk.stop)
        self.pass_s += time.perf_counter() - t

    def merge(self, other: HeadTally) -> None:
        """Add the tally of the following samples."""
        if other.start is None or other.stop is None:
            return
        self._extend(other.start, other.stop)
        self.top1 += other.top1
        self.top5 += other.top5
        self.pred += other.pred
        self.bits += other.bits
        self.fold_s += other.fold_s
        self.pass_s += other.pass_s

    def _joined(self) -> tuple[np.ndarray, np.ndarray]:
        k = len(self.chosen)
        if not self.pred:
            return np.zeros((k, k, 0), np.int32), np.zeros((k, k, 0), bool)
        return np.concatenate(self.pred, axis=2), np.concatenate(self.bits, axis=2)

    def state(self) -> State:
        """Counts, predictions and packed correctness bits (``np.packbits`` along the rows)."""
        pred, bits = self._joined()
        return {"start": self.start, "stop": self.stop, "top1": self.top1, "top5": self.top5,
                "pred": pred, "correct": np.packbits(bits, axis=2),
                "fold_s": self.fold_s, "pass_s": self.pass_s}

    def load(self, st: State) -> None:
        """Restore :meth:`state` into a fresh tally."""
        self.start, self.stop = st["start"], st["stop"]
        rows = 0 if self.start is None else int(self.stop) - int(self.start)
        self.top1 = np.array(st["top1"], np.int64)
        self.top5 = np.array(st["top5"], np.int64)
        self.pred = [np.array(st["pred"], np.int32)]
        self.bits = [np.unpackbits(st["correct"], axis=2, count=rows).astype(bool)]
        self.fold_s, self.pass_s = float(st["fold_s"]), float(st["pass_s"])

    def result(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(top1 hits ``[S, T]``, top5 hits, pred ``[S, T, n]`` int32, packed correctness
        ``[S, T, ceil(n/8)]`` uint8) over samples ``0…n``, which the tally must cover."""
        if n and (self.start, self.stop) != (0, n):
            raise InternalError(f"the tally covers samples {self.start}–{self.stop}, not 0–{n}")
        pred, bits = self._joined()
        return self.top1, self.top5, pred, np.packbits(bits, axis=2)


def _run_labels(st: StoreLike) -> np.ndarray:
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


def _checked_heads(st: StoreLike, chosen: Sequence[str]) -> dict[str, Head]:
    """The networks' heads (background rows stripped), refused unless they score the same
    classes and fit the stored features."""
    heads = {m: st.head(m) for m in chosen}
    ks = {m: h.num_classes for m, h in heads.items()}
    if len(set(ks.values())) > 1:
        raise AffeqError(f"the networks score different numbers of classes ({ks}) after dropping "
                         "TF-slim background rows", "check each spec's num_classes/label_offset")
    for m in chosen:
        _check_features(st, m, heads[m])
    return heads


def _table(tally: HeadTally, ms: MapSet, chosen: Sequence[str], heads: Mapping[str, Head],
           labelled: bool, n: int) -> EvalTable:
    """The N×N table from the pass's tally (top-1/top-5 with labels, agreement always)."""
    hits1, hits5, pred, correct = tally.result(n)
    nn = len(chosen)
    top1 = 100.0 * hits1.astype(np.float64) / n if labelled else np.full((nn, nn), np.nan)
    top5 = 100.0 * hits5.astype(np.float64) / n if labelled else np.full((nn, nn), np.nan)
    own = pred[np.arange(nn), np.arange(nn)]             # [N, n]: each network's own prediction
    agree = 100.0 * (pred == own[None, :, :]).mean(axis=2) if n else np.full((nn, nn), np.nan)
    agree_unmapped = 100.0 * (own[:, None, :] == own[None, :, :]).mean(axis=2) if n else agree
    return EvalTable(models=list(chosen), n=n, labelled=labelled, top1=top1, top5=top5,
                     agree=agree, agree_unmapped=agree_unmapped, pred=pred,
                     correct=correct if labelled else None, pair_info=_pair_info(ms, chosen),
                     label_offsets={m: heads[m].label_offset for m in chosen},
                     timings={"fold_s": tally.fold_s, "pass_s": tally.pass_s})


def evaluate(store: StoreLike | str | os.PathLike, maps: MapSet | str | os.PathLike, *,
             device: str = "auto", models: Sequence[str] | None = None,
             overlap_pairs: Iterable[tuple[str, str]] | None = None,
             progress: Progress | None = None, executor: Executor | None = None,
             controls: bool = False) -> EvalTable:
    """The N×N table of a store under a set of maps, with the overlaps of ``overlap_pairs``
    (default: the two most accurate networks both ways; none without labels). Writes nothing.

    One pass of the engine over the store's rows (:class:`HeadTally`: each source scored with
    all targets' folded heads stacked). Without labels the table holds agreement only (how often
    the hybrid predicts what the target predicts). ``progress`` counts images. ``executor``
    (None: ``engine.LocalExecutor``) runs the pass, e.g. on ``affeq_rt.cluster.RayExecutor``;
    the table is the same. ``controls``: the same table for the control sources the maps hold
    (``method.controls``: ``A~noise``, ``A~shuffled`` from ``fit --controls``; ``A~random`` with
    the store's ``A~random`` features), scored in the same pass, in ``EvalTable.controls``; control
    sources are then left out of the table's networks.
    """
    t0 = time.perf_counter()
    st = open_store(store)
    ms = as_mapset(maps)
    if controls:
        models = real_networks(models or st.models)
    chosen = _check_inputs(st, ms, models)
    dev = resolve_device(device)
    heads = _checked_heads(st, chosen)
    labelled = _labels(st) is not None
    n = int(st.n)
    tally = HeadTally(ms, st, chosen, dev)
    reducers: dict[str, Any] = {"tally": tally}
    columns = list(chosen)
    if controls:  # the control hybrids: one more reducer of the same pass
        entries = control_entries(ms, chosen, st.models)
        columns += list(dict.fromkeys(control_name(a, k) for k, a, _ in entries if k == "random"))
        reducers["controls"] = ControlTally(ms, heads, entries, _run_labels(st), dev)
    try:
        chunk = min(EVAL_CHUNK, getattr(executor, "shard_size", None) or EVAL_CHUNK)
        run_pass(StoreSource(st, columns, chunk=chunk), reducers, executor=executor,
                 progress=progress, task="evaluate")
    finally:
        tally.release()
    table = _table(tally, ms, chosen, heads, labelled, n)
    table.device, table.seconds = dev, time.perf_counter() - t0
    if controls:
        own = table.pred[np.arange(len(chosen)), np.arange(len(chosen))]
        table.controls = control_table(chosen, entries, reducers["controls"].joined(), own,
                                       _labels(st), table.top1 if labelled else table.agree,
                                       same_map_pairs(ms, entries))
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
