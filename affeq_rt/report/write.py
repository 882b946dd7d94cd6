"""The report folder: ``write_report(table, out)`` writes every format of an evaluation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.io.fsio import (
    atomic_path,
    jsonable,
    staged_files,
    versions,
    write_bytes_atomic,
    write_json_atomic,
)
from affeq_rt.method.curve import Curve, load_curve
from affeq_rt.method.results import EvalTable
from affeq_rt.method.similarity import SimilarityTable, load_similarity, loss_correlations
from affeq_rt.report.answer import QUESTION, answer_html, answer_rows, answer_text
from affeq_rt.report.controls import TITLE as CONTROLS_TITLE
from affeq_rt.report.controls import controls_html, controls_markdown
from affeq_rt.report.curve import TITLE as CURVE_TITLE
from affeq_rt.report.curve import curve_html, curve_paths, curve_png
from affeq_rt.report.figures import heatmap_png, overlap_png
from affeq_rt.report.html import html_report
from affeq_rt.report.similarity import TITLE as SIMILARITY_TITLE
from affeq_rt.report.similarity import similarity_html, similarity_paths
from affeq_rt.report.tables import csv_text, markdown_table, overlap_markdown


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def fit_extras(maps: str | Path | object, similarity: str | Path | None = None
               ) -> dict[str, object]:
    """``write_report`` keyword arguments for what lies beside a maps file: its data-efficiency
    curve (``MAPS.curve.json``, written by ``affeq-rt fit``) and its similarity tables
    (``MAPS.similarity.json``, ``fit --similarity``), or the ``similarity`` file given."""
    out: dict[str, object] = {}
    if isinstance(maps, (str, Path)) and curve_paths(maps)["json"].is_file():
        out["curve"] = load_curve(curve_paths(maps)["json"])
    if similarity is None and isinstance(maps, (str, Path)) \
            and similarity_paths(maps)["json"].is_file():
        similarity = similarity_paths(maps)["json"]
    if similarity is not None:
        out["similarity"] = load_similarity(similarity)
    return out


def _markdown(table: EvalTable, title: str, notes: Sequence[str], answer: list) -> str:
    """table.md: the table, the overlaps, the one-place answer, the controls, the notes."""
    md = f"# {title}\n\n" + markdown_table(table)
    if table.overlaps:
        md += "\n## Overlap of correct images (paper Fig. 5)\n\n" + overlap_markdown(table.overlaps)
    if answer:  # issue 22: controls, calibrated similarity, family gaps, k-NN in one place
        md += f"\n## {QUESTION}\n\n```\n{answer_text(answer)}\n```\n"
    if table.controls is not None:  # method.controls: real − control margins
        md += f"\n## {CONTROLS_TITLE}\n\n" + controls_markdown(table.controls)
    for note in notes:
        md += f"\n{note}\n"
    return md


def _json_doc(table: EvalTable, title: str, notes: Sequence[str], answer: list,
              similarity: SimilarityTable | None, curve: Curve | None) -> dict[str, Any]:
    """table.json: the table's own numbers and every section's."""
    doc = table.to_dict()
    doc["title"] = title
    doc["notes"] = list(notes)
    doc["overlaps"] = [o.to_dict() for o in table.overlaps]
    doc["versions"] = versions()
    if similarity is not None:  # beside the hybrids: report.similarity, method.similarity
        doc["similarity"] = similarity.to_dict()
        doc["similarity_vs_loss"] = loss_correlations(similarity, table)
    if curve is not None:  # the maps' data-efficiency curve (method.curve)
        doc["curve"] = curve.to_dict()
    if answer:
        doc["answer"] = {"question": QUESTION, "pairs": answer}
    return json.loads(json.dumps(doc, default=jsonable))


def _html_sections(table: EvalTable, answer: list, similarity: SimilarityTable | None,
                   curve: Curve | None, figures: bool) -> list[tuple[str, str]]:
    """The page's sections after the table: answer, controls, similarity, curve."""
    sections = [(QUESTION, answer_html(answer))] if answer else []
    if table.controls is not None:
        sections.append((CONTROLS_TITLE, controls_html(table.controls)))
    if similarity is not None:
        sections.append((SIMILARITY_TITLE, similarity_html(similarity, table)))
    if curve is not None:
        sections.append((CURVE_TITLE, curve_html(curve, curve_png(curve) if figures else None)))
    return sections


def write_report(table: EvalTable, out: str | Path, *, title: str | None = None,
                 notes: Sequence[str] = (), extra_sections: Sequence[tuple[str, str]] = (),
                 figures: bool = True, similarity: SimilarityTable | None = None,
                 curve: Curve | None = None) -> dict[str, Path]:
    """Write table.md/.csv/.json, heatmap.png, overlap.png (``table.overlaps``), report.html and
    the per-image arrays (``pred.npy`` [N, N, n] int32; ``correct.npy`` [N, N, ceil(n/8)] packed
    bits) of an ``evaluate`` result into ``out``. Returns the written paths by kind.
    ``similarity`` (``method.similarity``) and ``curve`` (the maps' ``method.curve``) add their
    sections to the page and their numbers to table.json.

    The files are written into a temporary folder beside ``out`` and moved in only when all of
    them are complete (``fsio.staged_files``): a failure — a full disk included, as one
    ``error: no space left…`` line — leaves no partial report."""
    final = Path(out)
    # The arrays twice at most (npy, plus the HTML's tables) and ~1 MB of figures and text.
    arrays = table.pred.nbytes + (table.correct.nbytes if table.correct is not None else 0)
    with staged_files(final, need=2 * arrays + (1 << 20)) as d:
        title = title or f"affeq-rt evaluation: {len(table.models)} networks, {table.n} images"
        overlaps = table.overlaps
        paths = {"markdown": d / "table.md", "csv": d / "table.csv", "json": d / "table.json",
                 "html": d / "report.html", "pred": d / "pred.npy"}
        answer = (answer_rows(table, similarity)
                  if table.controls is not None or similarity is not None else [])
        write_bytes_atomic(paths["markdown"], _markdown(table, title, notes, answer).encode())
        write_bytes_atomic(paths["csv"], csv_text(table).encode())
        write_json_atomic(paths["json"], _json_doc(table, title, notes, answer, similarity,
                                                   curve))
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
        page = html_report(table, overlaps, heat, ov, title, notes,
                           [*_html_sections(table, answer, similarity, curve, figures),
                            *extra_sections])
        write_bytes_atomic(paths["html"], page.encode())
    return {kind: final / p.name for kind, p in paths.items()}
