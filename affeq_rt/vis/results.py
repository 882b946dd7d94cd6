"""Results of the visualisation commands (what ``cam``, ``ablate`` and ``layers`` return), kept
apart so that figures and report sections read them without importing the code that makes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class CamImage:
    """One image's maps. ``roles`` ⊂ (src, dst, hybrid); per role: ``maps`` [k, h, w] raw CAM
    values for ``classes``, ``probs`` [k] of those classes, ``top1`` its own best class,
    ``peaks`` the (x, y) of each map's maximum in ORIGINAL image pixels."""

    path: str
    size: tuple[int, int]
    classes: list[int]
    names: list[str]
    maps: dict[str, np.ndarray]
    probs: dict[str, list[float]]
    top1: dict[str, int]
    peaks: dict[str, list[tuple[float, float]]]
    correlation: dict[str, float]
    crops: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (maps omitted)."""
        return {"path": self.path, "size": list(self.size), "classes": self.classes,
                "names": self.names, "probs": self.probs, "top1": self.top1,
                "peaks": {r: [list(p) for p in v] for r, v in self.peaks.items()},
                "correlation": self.correlation}


@dataclass
class CamResult:
    """What :func:`cam` computed: role → network label, one :class:`CamImage` per image, files."""

    labels: dict[str, str]
    images: list[CamImage]
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """Lines for the CLI: per image the top class per role and the correlations."""
        lines = []
        for im in self.images:
            best = ", ".join(f"{self.labels[r]}: {im.names[0]} {im.probs[r][0]:.2f}"
                             for r in im.maps)
            corr = "  ".join(f"r(hybrid, {self.labels[r]}) = {v:+.3f}"
                             for r, v in im.correlation.items())
            lines.append(f"{Path(im.path).name}: {best}" + (f"\n  {corr}" if corr else ""))
        lines += [f"wrote {p}" for p in self.files.values()]
        return "\n".join(lines)


@dataclass
class AblationTable:
    """Rows = networks then hybrids (``A→B``); columns = corruptions (``clean`` first).
    ``score`` [R, C] %: top-1 (``measure`` = "top-1") or agreement with the row's own clean
    prediction ("agreement"); ``confidence`` [R, C]: mean top softmax probability; ``pred``
    [R, C, n] int32 the predicted classes of the ``n`` readable images."""

    rows: list[str]
    corruptions: list[str]
    families_: list[str]
    measure: str
    score: np.ndarray
    confidence: np.ndarray
    pred: np.ndarray
    n: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def families(self) -> dict[str, list[int]]:
        """Corruption columns by family (clean excluded), in column order."""
        out: dict[str, list[int]] = {}
        for c, f in enumerate(self.families_):
            if f != "clean":
                out.setdefault(f, []).append(c)
        return out

    def cell(self, row: str, corruption: str) -> float:
        """``score`` of one row and corruption."""
        return float(self.score[self.rows.index(row), self.corruptions.index(corruption)])

    def markdown(self) -> str:
        """The table: one row per network/hybrid, score (confidence) per corruption."""
        head = f"| {self.measure} % (mean confidence) | " + " | ".join(self.corruptions) + " |"
        lines = [head, "|---" * (len(self.corruptions) + 1) + "|"]
        for r, name in enumerate(self.rows):
            lines.append(f"| {name} | " + " | ".join(
                f"{self.score[r, c]:.1f} ({self.confidence[r, c]:.2f})"
                for c in range(len(self.corruptions))) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (no predictions)."""
        return {"measure": self.measure, "n": self.n, "rows": self.rows,
                "corruptions": self.corruptions, "families": self.families_,
                "score": self.score.tolist(), "confidence": self.confidence.tolist(),
                "skipped": self.skipped}


@dataclass
class LayerView:
    """One layer: tensor ``name``, ``shape`` (C, h, w), channel ``mean`` [h, w], the strongest
    ``channels`` (by mean activation) and their ``maps`` [k, h, w]."""

    name: str
    shape: tuple[int, int, int]
    mean: np.ndarray
    channels: list[int]
    maps: np.ndarray


@dataclass
class LayerViews:
    """A network's layer views of one image (``crop``: the network's uint8 input crop)."""

    network: str
    image: str
    crop: np.ndarray
    layers: list[LayerView]
    available: int
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (arrays omitted)."""
        return {"network": self.network, "image": self.image, "available_4d_tensors":
                self.available, "layers": [{"name": v.name, "shape": list(v.shape),
                                            "channels": v.channels} for v in self.layers]}
