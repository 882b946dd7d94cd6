"""The data-efficiency curve (``method.curve``) as files and a report section: CSV/JSON tables,
a PNG (score against training images, one line per hybrid), and the HTML table."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np

from affeq_rt.io.fsio import write_bytes_atomic, write_json_atomic
from affeq_rt.method.curve import Curve
from affeq_rt.report.figures import _plt
from affeq_rt.vis.figures import img_tag

TITLE = "Data efficiency: how many images does the map need?"


def curve_paths(maps_path: str | Path) -> dict[str, Path]:
    """The curve files beside a maps file: ``maps.safetensors`` → ``maps.curve.{json,csv,png}``."""
    p = Path(maps_path)
    stem = p.with_suffix("") if p.suffix == ".safetensors" else p
    return {k: stem.with_name(f"{stem.name}.curve.{k}") for k in ("json", "csv", "png")}


def curve_csv(curve: Curve) -> str:
    """One row per (training images, source, target)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["images", "source", "target", f"score_{curve.measure}", "target_own", "r2_holdout"])
    for r in curve.rows():
        w.writerow([r["images"], r["source"], r["target"],
                    *("" if r[k] is None else f"{r[k]:.6f}" for k in ("score", "own_target",
                                                                      "r2"))])
    return buf.getvalue()


def curve_png(curve: Curve) -> bytes:
    """Score (or held-out R²) of every hybrid against the number of training images (log₂ axis);
    dashed: each target network on its own features."""
    plt = _plt()
    scored = curve.points and curve.points[0].get("score") is not None
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(12 if scored else 6.5, 4.6),
                             squeeze=False)
    xs = [p["images"] for p in curve.points]
    k = len(curve.models)
    cmap = plt.get_cmap("tab20" if k * (k - 1) > 10 else "tab10")
    panels = (["score"] if scored else []) + ["r2"]
    for ax, key in zip(axes[0], panels, strict=True):
        c = 0
        for i, a in enumerate(curve.models):
            for j, b in enumerate(curve.models):
                if i == j:
                    continue
                ys = [np.nan if p[key][i][j] is None else p[key][i][j] for p in curve.points]
                ax.plot(xs, ys, "o-", ms=3, lw=1.2, color=cmap(c % cmap.N), label=f"{a}→{b}")
                c += 1
        if key == "score":
            for j in range(k):
                own = curve.points[-1]["score"][j][j]
                if own is not None:
                    ax.axhline(own, ls="--", lw=0.8, color="grey")
            ax.set_ylabel(f"hybrid {curve.measure} (%)")
            ax.set_title(f"{curve.measure} on {curve.eval_images} held-out images "
                         "(dashed: each network alone)", fontsize=9)
        else:
            ax.set_ylabel("held-out R² of the map")
            ax.set_title(f"R² on {curve.eval_images} held-out images", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training images of the map")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2 if k * (k - 1) > 8 else 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_curve(curve: Curve, maps_path: str | Path, figure: bool = True) -> dict[str, Path]:
    """Write the curve's JSON, CSV and PNG beside the maps file (atomic writes)."""
    paths = curve_paths(maps_path)
    write_json_atomic(paths["json"], curve.to_dict())
    write_bytes_atomic(paths["csv"], curve_csv(curve).encode())
    if figure:
        write_bytes_atomic(paths["png"], curve_png(curve))
    else:
        paths.pop("png")
    return paths


def curve_text(curve: Curve) -> str:
    """A compact terminal table: one row per hybrid, one column per point."""
    key = "score" if curve.points and curve.points[0].get("score") is not None else "r2"
    what = f"{curve.measure} %" if key == "score" else "held-out R²"
    head = "hybrid".ljust(28) + "".join(f"{p['images']:>9d}" for p in curve.points)
    lines = [f"data-efficiency curve ({what} on {curve.eval_images} held-out images, "
             f"against training images):", head]
    for i, a in enumerate(curve.models):
        for j, b in enumerate(curve.models):
            if i != j:
                vals = [p[key][i][j] for p in curve.points]
                lines.append(f"{a}->{b}"[:27].ljust(28) + "".join(
                    "        –" if v is None else (f"{v:9.2f}" if key == "score" else f"{v:9.4f}")
                    for v in vals))
    return "\n".join(lines)


def curve_html(curve: Curve, png: bytes | None = None) -> str:
    """The report section: the table (score and R² per point) and the figure."""
    e = html.escape
    scored = curve.points and curve.points[0].get("score") is not None
    head = "".join(f"<th>{p['images']}</th>" for p in curve.points)
    rows = []
    for i, a in enumerate(curve.models):
        for j, b in enumerate(curve.models):
            if i == j:
                continue
            cells = []
            for p in curve.points:
                r2 = p["r2"][i][j]
                r2s = "–" if r2 is None else f"{r2:.3f}"
                if scored:
                    v = p["score"][i][j]
                    cells.append(f"<td>{'–' if v is None else f'{v:.1f}%'}"
                                 f"<div class='sub'>R² {r2s}</div></td>")
                else:
                    cells.append(f"<td>{r2s}</td>")
            own = (curve.points[-1]["score"][j][j] if scored else None)
            tail = f"<td>{own:.1f}%</td>" if own is not None else ("<td>–</td>" if scored else "")
            rows.append(f"<tr><th>{e(a)}→{e(b)}</th>{''.join(cells)}{tail}</tr>")
    what = (f"{curve.measure} of the hybrid (small: held-out R² of the map)" if scored
            else "held-out R² of the map")
    note = (f"<p class='note'>One pass: the training Gram was snapshotted after each number of "
            f"training images (columns) and every pair's {e(curve.method.upper())} map solved "
            f"from it; {e(what)} on the same {curve.eval_images} held-out images.</p>")
    own_head = "<th>target alone</th>" if scored else ""
    table = (f"<div class='wide'><table><tr><th>hybrid \\ training images</th>{head}{own_head}"
             f"</tr>{''.join(rows)}</table></div>")
    return note + table + (img_tag(png, "data-efficiency curve") if png else "")
