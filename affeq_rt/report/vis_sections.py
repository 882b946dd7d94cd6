"""Report sections from visualisation results: "What the hybrid sees" (CAM strips) and
"Robustness" (the ablation table and plot), as ``(heading, html)`` pairs for
``write_report(..., extra_sections=…)``. Formats only: the numbers come from ``vis``."""

from __future__ import annotations

import html

from affeq_rt.vis.ablate import ablation_html_table
from affeq_rt.vis.figures import ablation_png, cam_png, cam_section, img_tag
from affeq_rt.vis.results import AblationTable, CamResult

SEES = "What the hybrid sees"
ROBUSTNESS = "Robustness"


def cam_report_section(res: CamResult, caption: str = "") -> tuple[str, str]:
    """The CAM strips of ``res`` (one figure per image, classes, probabilities, correlations)."""
    pngs = [cam_png(res, im) for im in res.images]
    note = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
    return (f"{SEES}: " + " / ".join(res.labels.values()), note + cam_section(res, pngs))


def robustness_report_section(table: AblationTable, caption: str = "") -> tuple[str, str]:
    """The ablation table (score and mean confidence per corruption) and its plot."""
    note = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
    what = (f"<p>{table.n} images; {table.measure} in % (mean confidence in brackets); A→B is "
            "B's classifier on A's mapped features. Corruptions act on the decoded image before "
            "each network's own preprocessing, with the same noise for every network.</p>")
    return (f"{ROBUSTNESS} ({table.measure})",
            note + what + ablation_html_table(table) +
            img_tag(ablation_png(table), "score against corruption strength"))
