"""One colour scale for every N×N view (HTML table and PNG heatmap), the baseline each cell is
coloured against, and the binomial interval shown in each cell.

A cell is coloured by its change against the right baseline, on a symmetric diverging scale
(red = worse, blue = better) whose limit is max(5, largest |change|), so a −0.84 % cell is pale
in the table exactly as in the heatmap:
- labelled: % change of top-1 from the source's own top-1 (thesis Table 5.2);
- unlabelled: agreement of the hybrid with the target's own prediction minus the two networks'
  unmapped agreement, in points (14 % against an 88 % baseline is −74 points: deep red, not green).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from affeq_rt.method.results import EvalTable

FLOOR = 5.0  # the scale reaches at least ±5 (% or points): small changes stay pale
Z95 = 1.959963984540054  # two-sided 95 % normal quantile

# Diverging red → white → blue (ColorBrewer RdBu, 9 classes), red for negative values.
_ANCHORS = np.array([
    (0x67, 0x00, 0x1f), (0xb2, 0x18, 0x2b), (0xd6, 0x60, 0x4d), (0xf4, 0xa5, 0x82),
    (0xfd, 0xdb, 0xc7), (0xf7, 0xf7, 0xf7), (0xd1, 0xe5, 0xf0), (0x92, 0xc5, 0xde),
    (0x43, 0x93, 0xc3), (0x21, 0x66, 0xac), (0x05, 0x30, 0x61)], np.float64) / 255.0
_STOPS = np.linspace(-1.0, 1.0, len(_ANCHORS))  # the white anchor (index 5) sits at 0


def rgb(t: float) -> tuple[float, float, float]:
    """Colour of a position t ∈ [−1, 1] (clipped): −1 dark red, 0 white, +1 dark blue."""
    t = float(np.clip(t, -1.0, 1.0)) if np.isfinite(t) else 0.0
    return tuple(float(np.interp(t, _STOPS, _ANCHORS[:, c])) for c in range(3))  # type: ignore


def hex_of(c: tuple[float, float, float]) -> str:
    """``#rrggbb``."""
    return "#" + "".join(f"{int(round(255 * v)):02x}" for v in c)


def text_colour(c: tuple[float, float, float]) -> str:
    """Black or white, whichever reads on ``c``."""
    return "white" if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 0.5 else "black"


@dataclass(frozen=True)
class CellScale:
    """What a table's cells are coloured by (``values`` [N, N], NaN on the diagonal), its unit
    and the symmetric limit shared by the HTML table and the heatmap."""

    values: np.ndarray
    limit: float
    label: str

    def colour(self, i: int, j: int) -> tuple[float, float, float]:
        """RGB of cell (i, j); the diagonal (the baseline itself) is grey."""
        if i == j:
            return (0.93, 0.93, 0.93)
        return rgb(self.values[i, j] / self.limit)

    def cmap(self):  # noqa: ANN201  (matplotlib type, imported lazily)
        """The same scale as a matplotlib colormap over [−limit, limit]."""
        from matplotlib.colors import LinearSegmentedColormap

        return LinearSegmentedColormap.from_list(
            "affeq_change", [((s + 1) / 2, tuple(a)) for s, a in zip(_STOPS, _ANCHORS,
                                                                     strict=True)])


def cell_scale(table: EvalTable) -> CellScale:
    """The baseline-relative values a table is coloured by (see the module docstring)."""
    nn = len(table.models)
    off = ~np.eye(nn, dtype=bool)
    if table.labelled:
        vals, label = table.change_top1.copy(), "% change of top-1 from the source's own"
    else:
        vals = table.agree - table.agree_unmapped
        label = "agreement minus the two networks' unmapped agreement (points)"
    vals = np.where(off, vals, np.nan)
    finite = np.abs(vals[np.isfinite(vals)])
    return CellScale(vals, max(FLOOR, float(finite.max()) if finite.size else 0.0), label)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n, in % (0–100)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (100.0 * max(0.0, mid - half), 100.0 * min(1.0, mid + half))


def count_of(pct: float, n: int) -> int | None:
    """Images behind a percentage of ``n`` (the tables store % of n, exact to 1e-6)."""
    return None if not np.isfinite(pct) else int(round(pct * n / 100.0))
