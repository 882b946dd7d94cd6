"""Results of the method: the N×N evaluation table, the paper's overlap of correct images, and
the validation rows. Plain values (arrays and numbers); computing them is ``method.evaluate`` /
``method.overlap``'s job, drawing them ``report``'s.

Conventions (thesis Table 5.2 and the paper §4):
- ``top1[A, B]`` is the accuracy (%) of C_B on mapped F_A; the diagonal is each network unmapped.
- ``change_top1[A, B] = (top1[A, B] − top1[A, A]) / top1[A, A] · 100``: % change relative to the
  SOURCE network's own accuracy.
- ``loss[A, B] = Acc(C_A(F_A)) − Acc(C_A(M_{B→A} F_B)) = top1[A, A] − top1[B, A]`` in percentage
  points: what A's classifier loses when A's features are replaced by B's (negative = gain).
  The loss of the hybrid A→B (row A, column B, as in ``top1``) is therefore ``loss[B, A]``;
  ``hybrid_loss_top1`` holds it aligned with ``top1`` (the CSV's per-row loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError

# Region names of the 3-set overlap (A's own, B's own, hybrid A→B), in display order.
REGIONS: tuple[str, ...] = ("A", "B", "H", "AB", "AH", "BH", "ABH", "none")


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
        """Images A gets right."""
        return self._count(lambda r: "A" in r)

    @property
    def right_b(self) -> int:
        """Images B gets right."""
        return self._count(lambda r: "B" in r)

    @property
    def right_hybrid(self) -> int:
        """Images the hybrid gets right."""
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
        """JSON-ready counts."""
        return {"a": self.a, "b": self.b, "hybrid": f"{self.a}->{self.b}", "n": self.n,
                "regions": dict(self.regions), "right_a": self.right_a, "right_b": self.right_b,
                "right_hybrid": self.right_hybrid, "wrong_b": self.n - self.right_b,
                "fixed": self.fixed, "fixed_a_right": self.fixed_a_right, "broken": self.broken}


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
    overlaps: list[Overlap] = field(default_factory=list)  # the paper's Fig. 5 for chosen pairs
    controls: Any = None  # method.controls.ControlTable: real − control margins, when asked

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

    @property
    def hybrid_loss_top1(self) -> np.ndarray:
        """Loss of each hybrid, aligned with ``top1``: ``[A, B]`` = top1[B, B] − top1[A, B], what
        B's classifier loses when fed A's mapped features instead of B's own (the paper's
        Loss_{B,A}; points, negative = gain). Equal to ``loss_top1.T``."""
        return self.loss_top1.T

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
        return self.change_top1[~np.eye(len(self.models), dtype=bool)]

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
        """Every number, JSON-ready (NaN → None); overlaps are listed separately."""
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
        if self.controls is not None:
            out["controls"] = self.controls.to_dict()
        return out


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


def _relative_change(acc: np.ndarray) -> np.ndarray:
    own = np.diag(acc)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(own > 0, (acc - own) / own * 100.0, np.nan)
