"""The data-efficiency curve: how good is every map after 1k, 2k, 4k, … training images?

The Gram is additive, so ``fit``'s one pass can snapshot the training accumulator when it has
taken 1000, 2000, 4000, … training rows (``GramAccumulator.snapshot``: a flushed copy that leaves
the running accumulator's blocks, and so the fitted maps, bit for bit unchanged). At each snapshot
every pair's OLS map is solved and scored on the same held-out rows: R² (always), and, where the
source's heads are known, the hybrid's top-1 (labelled) or its agreement with the target's own
prediction (:func:`method.evaluate.evaluate` on those rows). The last point is the whole training
set. The held-out rows must be addressable (a feature store or arrays): on an image folder the
curve is off (extract a store first). At most ``max_rows`` held-out rows are scored (the first in
sample order), so the cost per point stays that of one small evaluation plus one OLS solve per
pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import read_json
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet
from affeq_rt.io.store import ArrayStore
from affeq_rt.method import solvers
from affeq_rt.method.evaluate import evaluate

FIRST_POINT = 1000
MAX_ROWS = 5000  # held-out rows scored per point


def curve_sizes(spec: str | Sequence[int] | None, n_train: int) -> list[int]:
    """Snapshot sizes (training rows) below ``n_train``: ``"auto"`` doubles from 1000 (none when
    there are fewer training rows than that), ``"off"``/None none, else the given sizes
    (``"500,1000"`` or a list; ≥ 2 each)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("off", "none", "")):
        return []
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        out, p = [], FIRST_POINT
        while p < n_train:
            out.append(p)
            p *= 2
        return out
    try:
        sizes = [int(s) for s in (spec.split(",") if isinstance(spec, str) else spec)
                 if str(s).strip()]
    except ValueError:
        raise AffeqError(f"--curve {spec!r} is not a list of image counts",
                         "pass e.g. --curve 1000,2000,4000, --curve auto or --no-curve") from None
    if any(s < 2 for s in sizes):
        raise AffeqError(f"--curve sizes must be ≥ 2, got {spec!r}", "pass e.g. --curve 1000,2000")
    return sorted({s for s in sizes if s < n_train})


@dataclass
class Curve:
    """Score of every map against the number of training images.

    ``points[p]``: ``images`` (training rows in the snapshot), ``score`` [N][N] (% top-1 or
    agreement of the hybrid row→column; None when heads are unknown; the diagonal is each network
    on its own, the same at every point) and ``r2`` [N][N] (held-out R²; None on the diagonal).
    """

    models: list[str]
    measure: str  # "top-1" | "agreement" | "R²"
    eval_images: int
    points: list[dict[str, Any]] = field(default_factory=list)
    method: str = "ols"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"models": list(self.models), "measure": self.measure,
                "eval_images": self.eval_images, "method": self.method,
                "points": [dict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Curve:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(list(d["models"]), str(d["measure"]), int(d["eval_images"]),
                       [dict(p) for p in d["points"]], str(d.get("method", "ols")))
        except (KeyError, TypeError, ValueError) as e:
            raise AffeqError(f"not a data-efficiency curve ({e})",
                             "pass the .curve.json that affeq-rt fit wrote") from None

    def rows(self) -> list[dict[str, Any]]:
        """Long form: one row per (images, source, target) hybrid."""
        out = []
        for p in self.points:
            for i, a in enumerate(self.models):
                for j, b in enumerate(self.models):
                    if i != j:
                        sc = p.get("score")
                        out.append({"images": p["images"], "source": a, "target": b,
                                    "score": None if sc is None else sc[i][j],
                                    "own_target": None if sc is None else sc[j][j],
                                    "r2": p["r2"][i][j]})
        return out


def load_curve(path: Any) -> Curve:
    """Read a ``.curve.json``."""
    return Curve.from_dict(read_json(path, "data-efficiency curve"))


def _mat(a: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]


class CurveRecorder:
    """Scores Gram snapshots on fixed held-out rows (see the module docstring)."""

    def __init__(self, sizes: Sequence[int], slices: Mapping[str, slice],
                 arrays: Mapping[str, Any], heads: Mapping[str, Head] | None,
                 labels: np.ndarray | None, mask: np.ndarray, device: str = "auto",
                 max_rows: int = MAX_ROWS) -> None:
        self.sizes = list(sizes)
        self.slices = dict(slices)
        self.names = list(slices)
        self.device = device
        rows = np.flatnonzero(mask)[: max(int(max_rows), 0)]
        if rows.size == 0:
            raise AffeqError("the data-efficiency curve needs held-out images",
                             "pass --holdout 0.1 (or more), or --no-curve")
        self.eval_images = int(rows.size)
        feats = {m: np.ascontiguousarray(arrays[m][rows], np.float32) for m in self.names}
        joint = np.ascontiguousarray(np.concatenate([feats[m] for m in self.names], axis=1))
        self._hold = GramAccumulator(joint.shape[1], device=device)
        self._hold.update(joint)
        lab = None if labels is None else np.asarray(labels, np.int64)[rows]
        if lab is not None and bool((lab < 0).any()):
            lab = None  # partly labelled: agreement, which needs no labels
        self._store = None
        if heads is not None:
            self._store = ArrayStore(feats, {m: (heads[m].weight, heads[m].bias)
                                             for m in self.names}, lab)
        self.measure = "R²" if heads is None else ("top-1" if lab is not None else "agreement")

    def score(self, train: GramAccumulator) -> dict[str, Any]:
        """One point: every pair's OLS map from ``train``, scored on the held-out rows."""
        k = len(self.names)
        r2 = np.full((k, k), np.nan)
        maps = []
        for i, a in enumerate(self.names):
            eig = solvers.source_eig(train, self.slices[a])
            for j, t in enumerate(self.names):
                if i == j:
                    continue
                w, b, st = solvers.ols(train, self.slices[a], self.slices[t], self._hold, eig=eig)
                r2[i, j] = np.nan if st.get("r2_holdout") is None else st["r2_holdout"]
                maps.append(AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), "ols"))
        point: dict[str, Any] = {"images": int(train.n), "r2": _mat(r2), "score": None}
        if self._store is not None:
            table = evaluate(self._store, MapSet(maps), device=self.device, overlap_pairs=[])
            point["score"] = _mat(table.top1 if table.labelled else table.agree)
        return point

    def finish(self, train: GramAccumulator, points: Sequence[dict[str, Any]]) -> Curve:
        """The curve: the snapshot points, then the whole training set."""
        pts = sorted((dict(p) for p in points), key=lambda p: p["images"])
        pts.append(self.score(train))
        return Curve(self.names, self.measure, self.eval_images, pts)
