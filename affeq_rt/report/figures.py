"""Figures of evaluation results (PNG bytes): the N×N heatmap and the paper's Fig. 5 overlaps."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from affeq_rt.method.results import REGIONS, EvalTable, Overlap
from affeq_rt.report.scale import cell_scale, text_colour

REGION_LABELS = {
    "A": "only A", "B": "only B", "H": "only hybrid", "AB": "A and B, not hybrid",
    "AH": "A and hybrid, not B", "BH": "B and hybrid, not A", "ABH": "all three",
    "none": "none",
}
REGION_COLORS = {"A": "#8fb3e0", "B": "#f2b880", "H": "#a9d18e", "AB": "#c9a0dc",
                 "AH": "#f5e663", "BH": "#8dd3c7", "ABH": "#d8a7c9", "none": "#dddddd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def heatmap_png(table: EvalTable) -> bytes:
    """N×N heatmap on the HTML table's colour scale (``report.scale``): cells coloured by % change
    from the source (labelled) or by agreement minus the unmapped agreement (unlabelled), red =
    worse, blue = better; each cell shows its number and the change under it."""
    plt = _plt()
    from matplotlib.colors import Normalize

    nn = len(table.models)
    size = max(4.5, 0.85 * nn + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    sc = cell_scale(table)
    val = np.nan_to_num(sc.values, nan=0.0)
    im = ax.imshow(val, cmap=sc.cmap(), norm=Normalize(vmin=-sc.limit, vmax=sc.limit))
    grey = np.zeros((nn, nn, 4))
    grey[np.eye(nn, dtype=bool)] = (*sc.colour(0, 0), 1.0)  # the baselines themselves
    ax.imshow(grey)
    for i in range(nn):
        for j in range(nn):
            if table.labelled:
                txt = f"{table.top1[i, j]:.1f}"
                if i != j:
                    txt += f"\n{table.change_top1[i, j]:+.1f}%"
            else:
                txt = f"{table.agree[i, j]:.0f}%"
                if i != j:
                    txt += f"\n[{table.agree_unmapped[i, j]:.0f}%]"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8 if nn <= 8 else 6.5,
                    color=text_colour(sc.colour(i, j)))
    cbar_label = sc.label
    ax.set_xticks(range(nn), table.models, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(nn), table.models, fontsize=8)
    ax.set_xlabel("target (classifier)")
    ax.set_ylabel("source (feature extractor)")
    ax.set_xticks(np.arange(-0.5, nn, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, nn, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    title = "top-1 of C_target(M F_source)" if table.labelled else \
        "agreement of C_target(M F_source) with C_target(F_target)"
    ax.set_title(f"{title}\n({table.n} images)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(cbar_label, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _venn(ax: Any, o: Overlap) -> None:
    """The 3-circle schematic of one pair (A dashed, B dotted, hybrid solid), exact counts."""
    from matplotlib.patches import Circle

    centers = {"A": (-0.55, 0.35), "B": (0.55, 0.35), "H": (0.0, -0.55)}
    styles = {"A": "--", "B": ":", "H": "-"}
    spots = {"A": (-1.05, 0.75), "B": (1.05, 0.75), "H": (0.0, -1.15), "AB": (0.0, 0.9),
             "AH": (-0.72, -0.38), "BH": (0.72, -0.38), "ABH": (0.0, 0.05)}
    names = {"A": f"A = {o.a}", "B": f"B = {o.b}", "H": f"hybrid {o.a}→{o.b}"}
    for s, c in centers.items():
        ax.add_patch(Circle(c, 1.0, facecolor=REGION_COLORS[s], alpha=0.35,
                            edgecolor="black", linestyle=styles[s], linewidth=1.6))
    for reg, (x, y) in spots.items():
        ax.text(x, y, f"{o.regions[reg]}", ha="center", va="center", fontsize=10,
                fontweight="bold" if reg == "AH" else "normal")
    ax.text(-1.7, -1.65, f"dashed: {names['A']}\ndotted: {names['B']}\nsolid: {names['H']}",
            ha="left", va="top", fontsize=8.5, linespacing=1.5)
    ax.set_xlim(-1.7, 1.7)
    ax.set_ylim(-2.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"images right, of {o.n}; none right: {o.regions['none']}\n"
                 "(areas schematic, counts exact)", fontsize=9)


def _region_bars(bx: Any, o: Overlap) -> None:
    """The 7 regions of one pair as bars to scale (an outsized "all three" bar cut, and said)."""
    from matplotlib.ticker import MaxNLocator

    regs = [g for g in REGIONS if g != "none"]
    counts = [o.regions[g] for g in regs]
    ypos = np.arange(len(regs))[::-1]
    # "all three" usually dwarfs the rest (the paper scaled it down 10x): when it does, its
    # bar is cut at the axis end and says so, and the other regions are drawn to scale.
    others = max([c for g, c in zip(regs, counts, strict=True) if g != "ABH"] + [1])
    xmax = others * 1.45 if o.regions["ABH"] > 2 * others else max(max(counts), 1) * 1.3
    bx.barh(ypos, np.minimum(counts, xmax), color=[REGION_COLORS[g] for g in regs],
            edgecolor="black", linewidth=0.5)
    for yv, cv in zip(ypos, counts, strict=True):
        label = f"{cv} ({100.0 * cv / max(o.n, 1):.1f}%)"
        if cv > xmax:
            bx.text(xmax * 0.98, yv, label + " – bar cut", va="center", ha="right", fontsize=8)
        else:
            bx.text(cv, yv, " " + label, va="center", fontsize=8)
    bx.set_yticks(ypos, [REGION_LABELS[g] for g in regs], fontsize=8)
    bx.set_xlim(0, xmax)
    bx.set_xlabel("images")
    bx.set_title(f"hybrid {o.a}→{o.b}\nfixed {o.fixed} of the {o.n - o.right_b} images "
                 f"B gets wrong; broken {o.broken}", fontsize=9)
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.spines[["top", "right"]].set_visible(False)


def overlap_png(overlaps: Sequence[Overlap]) -> bytes:
    """Per pair: a 3-circle Venn schematic (A dashed, B dotted, hybrid solid, as in the paper's
    Fig. 5) with the count of every region, beside a bar breakdown of the 7 regions to scale."""
    plt = _plt()
    rows = max(1, len(overlaps))
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.35]})
    for r, o in enumerate(overlaps):
        _venn(axes[r, 0], o)
        _region_bars(axes[r, 1], o)
    if not overlaps:
        axes[0, 0].axis("off")
        axes[0, 1].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
