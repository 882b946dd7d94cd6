"""Text formats of evaluation results: terminal table, Markdown (thesis Table 5.2 layout, and the
per-hybrid loss/gain in the paper's Table 1 layout), CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np

from affeq_rt.method.results import REGIONS, EvalTable, Overlap


def _pct(v: float, signed: bool = False, digits: int = 2) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return s.replace("-", "−") + "%"


def _short(names: Sequence[str], width: int) -> list[str]:
    return [n if len(n) <= width else n[: width - 1] + "…" for n in names]


def text_table(table: EvalTable, width: int = 9) -> str:
    """Plain-text N×N table for a terminal: accuracy (or agreement) with the change under it."""
    width = max(width, min(24, max(len(m) for m in table.models)))
    names = _short(table.models, width)
    rw = max(12, max(len(n) for n in table.models) + 1)
    head = "source \\ target".ljust(rw) + "".join(n.rjust(width + 1) for n in names)
    lines = [head]
    for i, src in enumerate(table.models):
        if table.labelled:
            top = [_pct(v) for v in table.top1[i]]
            sub = ["" if i == j else f"({_pct(v, True, 1)})"
                   for j, v in enumerate(table.change_top1[i])]
        else:
            top = [_pct(v, digits=1) for v in table.agree[i]]
            sub = ["" if i == j else f"[{_pct(v, digits=1)}]"
                   for j, v in enumerate(table.agree_unmapped[i])]
        lines.append(src[:rw - 1].ljust(rw) + "".join(c.rjust(width + 1) for c in top))
        lines.append("".ljust(rw) + "".join(c.rjust(width + 1) for c in sub))
    if table.labelled:
        lines.append("cells: top-1 of C_target(M F_source); (…): % change from the source's own "
                     "top-1 (diagonal)")
    else:
        lines.append("cells: % images where C_target(M F_source) predicts what the target "
                     "predicts itself; […]: unmapped agreement of the two networks")
    return "\n".join(lines)


def markdown_table(table: EvalTable) -> str:
    """Thesis Table 5.2 layout: rows = source features, columns = target classifier; each cell the
    accuracy with the % change from the source's own accuracy under it (agreement when unlabelled).
    Labelled tables are followed by the per-hybrid loss/gain (``loss_gain_markdown``).
    """
    cols = "| source \\ target | " + " | ".join(table.models) + " |"
    sep = "|---|" + "---:|" * len(table.models)
    rows = [cols, sep]
    for i, src in enumerate(table.models):
        cells = []
        for j in range(len(table.models)):
            if table.labelled:
                top = f"**{_pct(table.top1[i, j])}**"
                sub = "" if i == j else f"<br><sub>{_pct(table.change_top1[i, j], True)}</sub>"
            else:
                top = f"**{_pct(table.agree[i, j], digits=1)}**"
                sub = "" if i == j else \
                    f"<br><sub>unmapped {_pct(table.agree_unmapped[i, j], digits=1)}</sub>"
            cells.append(top + sub)
        rows.append(f"| **{src}** | " + " | ".join(cells) + " |")
    if table.labelled:
        legend = ("Rows: feature extractor (source); columns: classifier (target). Large: top-1 "
                  "accuracy of the hybrid C_target(M F_source) on "
                  f"{table.n} images; small: % change from the source's own accuracy (diagonal).")
    else:
        legend = ("No labels: large = % of images where C_target(M F_source) predicts what the "
                  "target predicts from its own features; small = how often the two networks "
                  f"agree unmapped ({table.n} images).")
    out = "\n".join(rows) + "\n\n" + legend + "\n"
    if table.labelled and len(table.models) > 1:
        out += "\n### Loss and gain per hybrid (paper Table 1 layout)\n\n" + \
            loss_gain_markdown(table)
    return out


def overlap_markdown(overlaps: Sequence[Overlap]) -> str:
    """The overlap counts of each chosen pair as a Markdown table."""
    if not overlaps:
        return ""
    head = ("| hybrid A→B | right A | right B | right hybrid | fixed (hybrid right, B wrong) | "
            "of which A right | broken (B right, hybrid wrong) | " +
            " | ".join(REGIONS) + " |")
    rows = [head, "|---" * (7 + len(REGIONS)) + "|"]
    for o in overlaps:
        rows.append(f"| {o.a}→{o.b} | {o.right_a} | {o.right_b} | {o.right_hybrid} | {o.fixed} | "
                    f"{o.fixed_a_right} | {o.broken} | " +
                    " | ".join(str(o.regions[r]) for r in REGIONS) + " |")
    return "\n".join(rows) + "\n"


def loss_gain_markdown(table: EvalTable) -> str:
    """Per-hybrid loss/gain laid out like the paper's Table 1: each network on its own features
    (A→A), then every hybrid A→B with B's classifier on A's mapped features, the number of images
    it labels correctly, the percentage, and its loss Acc(C_B(F_B)) − Acc(C_B(M F_A)) in points
    (the paper's Loss_{B,A}; negative = gain). Empty for unlabelled tables."""
    if not table.labelled:
        return ""
    loss = table.hybrid_loss_top1
    rows = ["| description | mapping | correct | percent | loss (points) |",
            "|---|---|---:|---:|---:|"]

    def correct(i: int, j: int) -> str:
        v = table.top1[i, j]
        return "–" if not np.isfinite(v) else str(int(round(v * table.n / 100)))

    for i, a in enumerate(table.models):
        rows.append(f"| {a} | {a}→{a} | {correct(i, i)} / {table.n} | {_pct(table.top1[i, i])} "
                    "| |")
    for i, a in enumerate(table.models):
        for j, b in enumerate(table.models):
            if i != j:
                v = loss[i, j]
                lv = "–" if not np.isfinite(v) else f"{v:+.2f}".replace("-", "−")
                rows.append(f"| {a} features, {b} classifier | {a}→{b} | {correct(i, j)} / "
                            f"{table.n} | {_pct(table.top1[i, j])} | {lv} |")
    legend = ("Loss of the hybrid A→B: B's own top-1 minus B's classifier on A's mapped features, "
              "in points (the paper's Loss_{B,A}); negative = gain.")
    return "\n".join(rows) + "\n\n" + legend + "\n"


def csv_text(table: EvalTable) -> str:
    """One row per (source, target) with every number; each row is the hybrid source→target.

    ``hybrid_loss_top1`` is that row's hybrid's loss, top1[target, target] − top1[source, target]
    (the paper's Loss_{target,source}, points, negative = gain), as ``EvalTable.hybrid_loss_top1``.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "target", "method", "n", "top1", "top5", "change_top1", "change_top5",
                "hybrid_loss_top1", "agree", "agree_unmapped"])
    lab = table.labelled
    for i, a in enumerate(table.models):
        for j, b in enumerate(table.models):
            def num(m: np.ndarray | None, ii: int = i, jj: int = j) -> str:
                return "" if m is None or not np.isfinite(m[ii, jj]) else f"{m[ii, jj]:.6f}"
            w.writerow([a, b, table.method(a, b), table.n, num(table.top1 if lab else None),
                        num(table.top5 if lab else None), num(table.change_top1 if lab else None),
                        num(table.change_top5 if lab else None),
                        num(table.hybrid_loss_top1 if lab else None), num(table.agree),
                        num(table.agree_unmapped)])
    return buf.getvalue()
