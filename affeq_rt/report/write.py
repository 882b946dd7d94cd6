"""The report folder: ``write_report(table, out)`` writes every format of an evaluation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from affeq_rt.io.fsio import (
    atomic_path,
    ensure_writable_dir,
    jsonable,
    versions,
    write_bytes_atomic,
    write_json_atomic,
)
from affeq_rt.method.results import EvalTable
from affeq_rt.report.figures import heatmap_png, overlap_png
from affeq_rt.report.html import html_report
from affeq_rt.report.tables import csv_text, markdown_table, overlap_markdown


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def write_report(table: EvalTable, out: str | Path, *, title: str | None = None,
                 notes: Sequence[str] = (), extra_sections: Sequence[tuple[str, str]] = (),
                 figures: bool = True) -> dict[str, Path]:
    """Write table.md/.csv/.json, heatmap.png, overlap.png (``table.overlaps``), report.html and
    the per-image arrays (``pred.npy`` [N, N, n] int32; ``correct.npy`` [N, N, ceil(n/8)] packed
    bits) of an ``evaluate`` result into ``out``. Returns the written paths by kind."""
    d = ensure_writable_dir(out)
    title = title or f"affeq-rt evaluation: {len(table.models)} networks, {table.n} images"
    overlaps = table.overlaps
    paths = {"markdown": d / "table.md", "csv": d / "table.csv", "json": d / "table.json",
             "html": d / "report.html", "pred": d / "pred.npy"}
    md = f"# {title}\n\n" + markdown_table(table)
    if overlaps:
        md += "\n## Overlap of correct images (paper Fig. 5)\n\n" + overlap_markdown(overlaps)
    for note in notes:
        md += f"\n{note}\n"
    write_bytes_atomic(paths["markdown"], md.encode())
    write_bytes_atomic(paths["csv"], csv_text(table).encode())
    doc = table.to_dict()
    doc["title"] = title
    doc["notes"] = list(notes)
    doc["overlaps"] = [o.to_dict() for o in overlaps]
    doc["versions"] = versions()
    write_json_atomic(paths["json"], json.loads(json.dumps(doc, default=jsonable)))
    _save_npy(paths["pred"], table.pred)
    if table.correct is not None:
        paths["correct"] = d / "correct.npy"
        _save_npy(paths["correct"], table.correct)
    heat = ov = None
    if figures:
        heat = heatmap_png(table)
        paths["heatmap"] = d / "heatmap.png"
        write_bytes_atomic(paths["heatmap"], heat)
        if overlaps:
            ov = overlap_png(overlaps)
            paths["overlap"] = d / "overlap.png"
            write_bytes_atomic(paths["overlap"], ov)
    page = html_report(table, overlaps, heat, ov, title, notes, extra_sections)
    write_bytes_atomic(paths["html"], page.encode())
    return paths
