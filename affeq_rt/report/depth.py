"""The layer-by-layer analysis (``method.depth``) as files: the stage × stage CKA table and
heatmap, the depth curves (text, CSV, JSON, PNG) and one self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np

from affeq_rt.io.fsio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from affeq_rt.method.depth import CONTROLS, DepthCurve, LayerAnalysis
from affeq_rt.report.figures import _plt
from affeq_rt.vis.figures import img_tag, page

TITLE = "Layer by layer: where does the other network's classifier become usable?"


def _label(la: LayerAnalysis, m: str) -> str:
    s = la.stages[m]
    return f"{s['network']}:{s['stage']}"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


#: The measures as the tables name them (``method.similarity`` matrices).
MEASURE_NAMES = {"cka": "linear CKA", "cka_debiased": "debiased CKA", "cca_mean": "mean CCA",
                 "svcca": "SVCCA", "r2": "R² (row stage → column stage)",
                 "procrustes": "Procrustes distance (0 = same up to rotation)",
                 "mutual_knn": "mutual k-NN agreement"}


def cka_text(la: LayerAnalysis, measures: tuple[str, ...] = ("cka", "cka_debiased")) -> str:
    """The ``measures`` blocks (default: linear, then debiased CKA) of the first network's stages
    (rows) against the last's (columns)."""
    a, b = la.networks[0], la.networks[-1]
    rows, cols = la.models_of(a), la.models_of(b)
    w = max(len(la.stages[m]["stage"]) for m in cols) + 7
    out: list[str] = []
    for what in measures:
        block = la.block(a, b, what)
        if block is None:
            continue
        out += ["" if out else None, f"{MEASURE_NAMES[what]} over {la.n} images: rows {a}, "
                f"columns {b}", "".ljust(12) + "".join(la.stages[m]["stage"].rjust(w)
                                                       for m in cols)]
        out += [la.stages[m]["stage"].ljust(12) + "".join(_num(v).rjust(w) for v in block[i])
                for i, m in enumerate(rows)]
    return "\n".join(x for x in out if x is not None)


def _controls_of(c: DepthCurve) -> list[str]:
    return [k for k in CONTROLS if any(k in p.controls for p in c.points)]


def _verdict(c: DepthCurve) -> str:
    """Where B's classifier becomes usable: the shallowest stage from which every point beats
    its controls and chance."""
    first = c.first_beating
    if first is None:
        return (f"  no stage beats its controls and chance ({c.chance:.1f}%) by 2 SE: "
                "this curve shows nothing beyond them")
    return (f"  usable from {first.stage} ({first.module}): from there on every stage beats "
            f"its controls and chance ({c.chance:.1f}%) by 2 SE")


def depth_text(la: LayerAnalysis) -> str:
    """One block per curve: stage, module, width, map rank, score, controls, beats."""
    out = []
    for c in la.curves:
        ctrl = _controls_of(c)
        out.append(f"depth curve {c.source} -> {c.target} ({c.method}; {c.metric} % on "
                   f"{c.scored} {c.scored_on} images, maps from {c.images}): {c.target} alone "
                   f"{c.target_own:.2f}" + ("" if c.source_own is None else
                                           f", {c.source} alone {c.source_own:.2f}")
                   + f", chance {c.chance:.2f}")
        out.append(f"  {'stage':9s} {'module':28s} {'dim':>6s}  {'rank':>10s}  {'score':>7s}"
                   + "".join(f"  {k:>8s}" for k in ctrl) + "  beats")
        for p in c.points:
            out.append(f"  {p.stage:9s} {p.module[:28]:28s} {p.dim:6d}  {p.rank:10d}  "
                       f"{p.score:7.2f}" + "".join(f"  {p.controls.get(k, float('nan')):8.2f}"
                                                   for k in ctrl)
                       + ("  yes" if p.beats else "  no"))
        out.append(_verdict(c))
    return "\n".join(out)


def cka_csv(la: LayerAnalysis) -> str:
    """Long form: row model, column model, every measure computed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    mats = la.similarity.measures()
    w.writerow(["row", "column", *mats])
    for i, a in enumerate(la.models):
        for j, b in enumerate(la.models):
            w.writerow([a, b, *("" if not np.isfinite(v) else repr(float(v))
                                for v in (m[i, j] for m in mats.values()))])
    return buf.getvalue()


def depth_csv(la: LayerAnalysis) -> str:
    """One row per (curve, stage)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "target", "method", "metric", "stage", "model", "module", "dim",
                "rank", "score", *(f"control_{k}" for k in CONTROLS), "beats", "chance",
                "target_own", "source_own"])
    for c in la.curves:
        for p in c.points:
            w.writerow([c.source, c.target, c.method, c.metric, p.stage, p.model, p.module,
                        p.dim, p.rank, repr(p.score),
                        *(repr(p.controls[k]) if k in p.controls else "" for k in CONTROLS),
                        int(p.beats), repr(c.chance), repr(c.target_own),
                        "" if c.source_own is None else repr(c.source_own)])
    return buf.getvalue()


def cka_png(la: LayerAnalysis) -> bytes:
    """The whole stage × stage CKA matrix as a heatmap (0…1), networks separated by lines."""
    plt = _plt()
    k = len(la.models)
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * k, 1.0 + 0.42 * k))
    im = ax.imshow(la.cka, vmin=0.0, vmax=1.0, cmap="magma")
    labels = [_label(la, m) for m in la.models]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    edge = 0
    for net in la.networks[:-1]:
        edge += len(la.models_of(net))
        ax.axhline(edge - 0.5, color="white", lw=1.5)
        ax.axvline(edge - 0.5, color="white", lw=1.5)
    if k <= 16:
        for i in range(k):
            for j in range(k):
                v = la.cka[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    ax.set_title(f"linear CKA over {la.n} images", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pairs(la: LayerAnalysis) -> list[list[DepthCurve]]:
    """The curves grouped by (source, target), in order: one group per panel."""
    groups: dict[tuple[str, str], list[DepthCurve]] = {}
    for c in la.curves:
        groups.setdefault((c.source, c.target), []).append(c)
    return list(groups.values())


def depth_png(la: LayerAnalysis) -> bytes:
    """One panel per pair: the hybrid's score against the source's stage, one line per method;
    grey: the shuffled-pairs control (x) and the random-weight source (triangles, per method),
    dash-dotted: chance; dashed: the target alone, dotted: the source alone."""
    plt = _plt()
    groups = _pairs(la)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.4 * len(groups), 4.2), squeeze=False)
    for ax, curves in zip(axes[0], groups, strict=True):
        c0 = curves[0]
        xs = list(range(len(c0.points)))
        for i, c in enumerate(curves):
            color = f"C{i}"
            ax.plot(xs, [p.score for p in c.points], "o-", lw=1.5, color=color, label=c.method)
            if any("random" in p.controls for p in c.points):
                ax.plot(xs, [p.controls.get("random", np.nan) for p in c.points], "^--",
                        lw=0.8, ms=4, color=color, alpha=0.55,
                        label=f"{c.source}~random ({c.method})")
        if any("shuffled" in p.controls for p in c0.points):
            ax.plot(xs, [p.controls.get("shuffled", np.nan) for p in c0.points], "x:",
                    color="grey", lw=0.8, label="shuffled pairs (ols)")
        ax.axhline(c0.chance, ls="-.", color="grey", lw=0.8, label="chance")
        ax.axhline(c0.target_own, ls="--", color="grey", lw=0.9, label=f"{c0.target} alone")
        if c0.source_own is not None:
            ax.axhline(c0.source_own, ls=":", color="grey", lw=0.9, label=f"{c0.source} alone")
        ax.set_xticks(xs, [p.stage for p in c0.points], fontsize=8)
        ax.set_xlabel(f"stage of {c0.source} (shallow → deep; last: its features)")
        ax.set_ylabel(f"{c0.metric} (%) through {c0.target}'s classifier")
        ax.set_title(f"{c0.source} → {c0.target} ({c0.scored} {c0.scored_on} images)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _curve_html(c: DepthCurve) -> str:
    e = html.escape
    ctrl = _controls_of(c)
    head = "".join(f"<th>{e(p.stage)}<div class='sub'>{e(p.module)}</div></th>"
                   for p in c.points)
    cells = "".join(f"<td>{'' if p.beats else '⚠ '}{p.score:.1f}%<div class='sub'>d {p.dim}, "
                    f"rank {p.rank}</div></td>" for p in c.points)
    rows = "".join(f"<tr><th>{e(k)}</th>" + "".join(
        f"<td>{p.controls[k]:.1f}%</td>" if k in p.controls else "<td>–</td>"
        for p in c.points) + "</tr>" for k in ctrl)
    own = f"{e(c.target)} alone {c.target_own:.1f}%" + (
        "" if c.source_own is None else f"; {e(c.source)} alone {c.source_own:.1f}%")
    return (f"<p><b>{e(c.source)} → {e(c.target)}</b> ({e(c.method)}, {e(c.metric)} on "
            f"{c.scored} images; {own}; chance {c.chance:.1f}%)</p><table><tr><th></th>{head}"
            f"</tr><tr><th>hybrid</th>{cells}</tr>{rows}</table><p class='note'>"
            f"{e(_verdict(c).strip())} (⚠: does not)</p>")


def _block_html(la: LayerAnalysis, measure: str) -> str:
    e = html.escape
    a, b = la.networks[0], la.networks[-1]
    block = la.block(a, b, measure)
    if block is None:
        return ""
    rows, cols = la.models_of(a), la.models_of(b)
    head = "".join(f"<th>{e(la.stages[m]['stage'])}</th>" for m in cols)
    body = "".join(f"<tr><th>{e(la.stages[m]['stage'])}</th>" +
                   "".join(f"<td>{_num(v)}</td>" for v in block[i]) + "</tr>"
                   for i, m in enumerate(rows))
    return (f"<p>{e(MEASURE_NAMES[measure])}, rows: stages of {e(a)}, columns: stages of "
            f"{e(b)}</p><table><tr><th></th>{head}</tr>{body}</table>")


def depth_html(la: LayerAnalysis, figures: bool = True) -> str:
    """The report section: curves with their controls as tables, every measure's block table
    and the figures."""
    parts = [f"<p class='note'>Every stage of each network pooled over space, mapped to the "
             f"other network's features by an affine map solved from one Gram pass over "
             f"{la.n} stored images, and scored through that network's unchanged classifier on "
             "images it never saw (held out, or a test store). The last point of each curve is "
             "the ordinary hybrid. Controls: "
             "the same least squares on mismatched image pairs (shuffled) and, where stored, "
             "from the same architecture with random weights; a point must clear each of them "
             "and chance by 2 standard errors.</p>"]
    parts += [_curve_html(c) for c in la.curves]
    if figures and la.curves:
        parts.append(img_tag(depth_png(la), "depth curves"))
    parts += [_block_html(la, m) for m in la.similarity.measures()]
    if figures:
        parts.append(img_tag(cka_png(la), "layer x layer CKA"))
    return "\n".join(p for p in parts if p)


def depth_report_section(la: LayerAnalysis) -> tuple[str, str]:
    """(title, HTML) for ``write_report(..., extra_sections=[...])``."""
    return TITLE, depth_html(la)


def write_depth(la: LayerAnalysis, out: str | Path, figures: bool = True) -> dict[str, Path]:
    """``depth.json``, ``depth.csv``, ``cka.csv``, ``depth.md`` and (with ``figures``)
    ``depth.png``, ``cka.png`` and ``depth.html`` into the folder ``out`` (atomic writes)."""
    d = ensure_writable_dir(Path(out))
    paths = {"json": d / "depth.json", "csv": d / "depth.csv", "cka_csv": d / "cka.csv",
             "markdown": d / "depth.md"}
    write_json_atomic(paths["json"], la.to_dict())
    write_bytes_atomic(paths["csv"], depth_csv(la).encode())
    write_bytes_atomic(paths["cka_csv"], cka_csv(la).encode())
    md = (f"# {TITLE}\n\n```\n{depth_text(la)}\n\n"
          f"{cka_text(la, tuple(la.similarity.measures()))}\n```\n")
    write_bytes_atomic(paths["markdown"], md.encode())
    if figures:
        paths.update(png=d / "depth.png", cka_png=d / "cka.png", html=d / "depth.html")
        if la.curves:
            write_bytes_atomic(paths["png"], depth_png(la))
        else:
            paths.pop("png")
        write_bytes_atomic(paths["cka_png"], cka_png(la))
        write_bytes_atomic(paths["html"], page(TITLE, depth_html(la)).encode())
    return paths
