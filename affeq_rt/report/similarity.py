"""Similarity tables (``method.similarity``): terminal text, Markdown, CSV, JSON and the HTML
section that sits beside the hybrid table, with each measure's correlation with the hybrid loss."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np

from affeq_rt.io.fsio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from affeq_rt.method.results import EvalTable
from affeq_rt.method.similarity import MEASURES, SimilarityTable, loss_correlations

TITLE = "Similarity of the networks' features"


def _num(v: float, digits: int = 4) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}".replace("-", "−")


def _short(names: list[str], width: int) -> list[str]:
    return [n if len(n) <= width else n[: width - 1] + "…" for n in names]


def similarity_text(sim: SimilarityTable) -> str:
    """Every N×N measure as a plain-text block (rows: source; R² is row → column)."""
    w = max(8, min(16, max(len(m) for m in sim.models)))
    names = _short(sim.models, w)
    rw = max(12, max(len(m) for m in sim.models) + 1)
    out = [f"{sim.n} images; ranks kept: " +
           ", ".join(f"{m} {sim.ranks.get(m, '?')}/{sim.dims.get(m, '?')}" for m in sim.models)]
    for key, mtx in sim.measures().items():
        out.append("")
        out.append(f"{key}: {MEASURES[key]}")
        out.append("".ljust(rw) + "".join(n.rjust(w + 1) for n in names))
        for i, a in enumerate(sim.models):
            out.append(a[: rw - 1].ljust(rw) + "".join(_num(v).rjust(w + 1) for v in mtx[i]))
    if sim.null:
        out += ["", f"permutation null ({sim.null['permutations']} within-chunk row permutations; "
                "calibrated = raw − null mean, p = (1 + #null beyond raw) / (K + 1)):"]
        for m, st in sim.null["measures"].items():
            raw = getattr(sim, m)
            for i, a in enumerate(sim.models):
                for j in range(i + 1, len(sim.models)):
                    out.append(f"  {m:10s} {a} ~ {sim.models[j]}: raw {_num(raw[i, j])}, null "
                               f"{_num(st['mean'][i, j])} ± {_num(st['sd'][i, j])}, calibrated "
                               f"{_num(st['calibrated'][i, j])}, p {_num(st['p'][i, j], 3)}")
    for warn in sim.warnings:
        out.append(f"warning: {warn}")
    return "\n".join(out)


def similarity_markdown(sim: SimilarityTable) -> str:
    """One Markdown table per measure."""
    out = [f"{sim.n} images. Rows and columns: networks (for R², the map row → column).", ""]
    for key, mtx in sim.measures().items():
        out += [f"### {key}: {MEASURES[key]}", "",
                "| | " + " | ".join(sim.models) + " |", "|---|" + "---:|" * len(sim.models)]
        out += [f"| **{a}** | " + " | ".join(_num(v) for v in mtx[i]) + " |"
                for i, a in enumerate(sim.models)]
        out.append("")
    out += [f"- warning: {w}" for w in sim.warnings]
    return "\n".join(out) + "\n"


def similarity_csv(sim: SimilarityTable) -> str:
    """Long form: measure, row, column, value."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["measure", "row", "column", "value"])
    for key, mtx in sim.measures().items():
        for i, a in enumerate(sim.models):
            for j, b in enumerate(sim.models):
                v = mtx[i, j]
                w.writerow([key, a, b, "" if not np.isfinite(v) else repr(float(v))])
    return buf.getvalue()


def similarity_paths(maps_path: str | Path) -> dict[str, Path]:
    """Beside a maps file: ``maps.safetensors`` → ``maps.similarity.{json,md,csv}``."""
    p = Path(maps_path)
    stem = p.with_suffix("") if p.suffix == ".safetensors" else p
    return {k: stem.with_name(f"{stem.name}.similarity.{ext}")
            for k, ext in (("json", "json"), ("markdown", "md"), ("csv", "csv"))}


def write_similarity(sim: SimilarityTable, out: str | Path, beside_maps: bool = False
                     ) -> dict[str, Path]:
    """``similarity.json`` / ``.md`` / ``.csv`` into the folder ``out``, or with ``beside_maps``
    beside the maps file ``out`` (``MAPS.similarity.*``, what ``fit --similarity`` writes);
    atomic writes."""
    if beside_maps:
        paths = similarity_paths(out)
    else:
        d = ensure_writable_dir(out)
        paths = {"json": d / "similarity.json", "markdown": d / "similarity.md",
                 "csv": d / "similarity.csv"}
    write_json_atomic(paths["json"], sim.to_dict())
    write_bytes_atomic(paths["markdown"], (f"# {TITLE}\n\n" + similarity_markdown(sim)).encode())
    write_bytes_atomic(paths["csv"], similarity_csv(sim).encode())
    return paths


def similarity_html(sim: SimilarityTable, table: EvalTable | None = None) -> str:
    """The measures as compact N×N grids (shaded 0…1, Procrustes 0…2 reversed) and, with the
    evaluation ``table``, how each measure correlates with the hybrids' loss across pairs."""
    e = html.escape
    parts = [f"<p class='note'>Exact over {sim.n} images from the joint Gram (no n×n kernels, "
             "no minibatches). R² is the OLS map row → column fitted and scored on those same "
             "images; the other measures are symmetric.</p>"]
    if table is not None:
        cor = loss_correlations(sim, table)
        if cor["measures"]:
            parts.append(f"<p>Across the {cor['pairs']} hybrids of the table above: correlation "
                         f"of each measure with the {e(cor['loss'])} (negative = the more "
                         "similar, the smaller the loss; Procrustes is a distance).</p>")
            rows = "".join(
                f"<tr><th>{e(k)}</th><td>{_num(v['pearson'], 3)}</td>"
                f"<td>{_num(v['spearman'], 3)}</td></tr>" for k, v in cor["measures"].items())
            parts.append("<table><tr><th>measure</th><th>Pearson</th><th>Spearman</th></tr>"
                         f"{rows}</table>")
    parts.append("<div class='grids'>")
    for key, mtx in sim.measures().items():
        lo, hi = (0.0, 2.0) if key == "procrustes" else (min(0.0, float(np.nanmin(mtx))), 1.0)
        head = "".join(f"<th>{e(m)}</th>" for m in sim.models)
        body = []
        for i, a in enumerate(sim.models):
            cells = []
            for v in mtx[i]:
                t = 0.0 if not np.isfinite(v) else (v - lo) / (hi - lo) if hi > lo else 0.0
                t = 1.0 - t if key == "procrustes" else t
                g = int(round(255 * (1 - 0.55 * min(max(t, 0.0), 1.0))))
                cells.append(f"<td style='background:#{g:02x}{g:02x}ff'>{_num(v, 3)}</td>")
            body.append(f"<tr><th>{e(a)}</th>{''.join(cells)}</tr>")
        parts.append(f"<div class='grid'><p><b>{e(key)}</b>: {e(MEASURES[key])}</p>"
                     f"<table><tr><th></th>{head}</tr>{''.join(body)}</table></div>")
    parts.append("</div>")
    parts += [f"<p class='note'>warning: {e(w)}</p>" for w in sim.warnings]
    return "\n".join(parts)
