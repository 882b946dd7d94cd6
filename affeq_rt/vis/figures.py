"""Figures and pages of the visualisation commands: CAM strips, layer grids, robustness plots
(PNG bytes from matplotlib, imported lazily; small self-contained HTML pages)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.io.fsio import ensure_writable_dir, write_bytes_atomic
from affeq_rt.vis.common import resample
from affeq_rt.vis.results import AblationTable, CamImage, CamResult, LayerViews

CSS = ("body{font-family:system-ui,Helvetica,Arial,sans-serif;margin:2em;max-width:1300px;"
       "color:#222}img{max-width:100%}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined as base64."""
    return (f"<img alt='{html.escape(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'>")


def page(title: str, body: str) -> str:
    """A self-contained HTML page."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}"
            "</body></html>\n")


def _normalised(m: np.ndarray, size: int) -> np.ndarray:
    """A CAM upsampled to the crop (bilinear) and scaled to [0, 1] (Zhou et al.'s display)."""
    u = resample(m, size)
    lo, hi = float(u.min()), float(u.max())
    return (u - lo) / (hi - lo) if hi > lo else np.zeros_like(u)


def cam_png(res: CamResult, im: CamImage) -> bytes:
    """One image: a row per top class; columns = the crop, then each role's CAM overlaid."""
    plt = _plt()
    roles = list(im.maps)
    k = len(im.classes)
    fig, axes = plt.subplots(k, len(roles) + 1, figsize=(3.0 * (len(roles) + 1), 3.0 * k),
                             squeeze=False)
    for i in range(k):
        ax = axes[i][0]
        ax.imshow(im.crops["src"])
        ax.set_title(f"{Path(im.path).name}\nclass: {im.names[i][:28]}", fontsize=8)
        for j, r in enumerate(roles, start=1):
            ax = axes[i][j]
            c = im.crops[r]
            ax.imshow(c)
            ax.imshow(_normalised(im.maps[r][i], c.shape[0]), cmap="jet", alpha=0.45,
                      vmin=0.0, vmax=1.0)
            ax.set_title(f"{res.labels[r]}\np = {im.probs[r][i]:.3f}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    if im.correlation:
        fig.suptitle("  ".join(f"r(hybrid, {res.labels[r]}) = {v:+.3f}"
                               for r, v in im.correlation.items()), fontsize=9)
    return _png(fig)


def cam_section(res: CamResult, pngs: Sequence[bytes]) -> str:
    """HTML for the CAM strips: per image the figure, its top classes and the correlations."""
    e = html.escape
    roles = list(res.labels)
    out = ["<p>Class activation maps CAM<sub>c</sub>(x, y) = Σ<sub>k</sub> W[c, k] f<sub>k</sub>"
           "(x, y) on each network's last spatial map; the hybrid's uses the folded head "
           "W<sub>B</sub>·M on A's map (exact: its mean over positions is the hybrid's logit "
           "minus its bias). Maps are scaled to [0, 1] per panel.</p>"]
    for im, png in zip(res.images, pngs, strict=True):
        rows = "".join(f"<tr><td style='text-align:left'>{e(n)}</td>" +
                       "".join(f"<td>{im.probs[r][i]:.3f}</td>" for r in roles) + "</tr>"
                       for i, n in enumerate(im.names))
        corr = "; ".join(f"correlation of the hybrid's map with {e(res.labels[r])}'s: "
                         f"<b>{v:+.3f}</b>" for r, v in im.correlation.items())
        out.append(f"<h3>{e(Path(im.path).name)}</h3><p>{corr}</p><table><tr><th>class</th>" +
                   "".join(f"<th>p({e(res.labels[r])})</th>" for r in roles) + f"</tr>{rows}"
                   f"</table>{img_tag(png, Path(im.path).name)}")
    return "\n".join(out)


def write_cam_outputs(res: CamResult, out: Path) -> dict[str, Path]:
    """``<stem>.png`` per image and ``cam.html``; returns {kind: path}."""
    ensure_writable_dir(out)
    files: dict[str, Path] = {}
    pngs = []
    for n, im in enumerate(res.images):
        png = cam_png(res, im)
        pngs.append(png)
        p = out / f"{n:02d}_{Path(im.path).stem}.png"
        write_bytes_atomic(p, png)
        files[f"png{n}"] = p
    title = "What the hybrid sees: " + " / ".join(res.labels.values())
    write_bytes_atomic(out / "cam.html", page(title, cam_section(res, pngs)).encode())
    files["html"] = out / "cam.html"
    return files


def layers_png(views: LayerViews) -> bytes:
    """A row per layer: the channel mean, then the strongest channels, upsampled to the crop."""
    plt = _plt()
    n = len(views.layers)
    cols = 2 + max(len(v.channels) for v in views.layers)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 2.0 * n), squeeze=False)
    for i, v in enumerate(views.layers):
        axes[i][0].imshow(views.crop)
        axes[i][0].set_title(f"{v.name[-24:]}\n{v.shape[0]}×{v.shape[1]}×{v.shape[2]}",
                             fontsize=7)
        size = views.crop.shape[0]
        axes[i][1].imshow(_normalised(v.mean, size), cmap="viridis")
        axes[i][1].set_title("channel mean", fontsize=7)
        for j, (c, m) in enumerate(zip(v.channels, v.maps, strict=True), start=2):
            axes[i][j].imshow(_normalised(m, size), cmap="viridis")
            axes[i][j].set_title(f"channel {c}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    return _png(fig)


def ablation_png(table: AblationTable) -> bytes:
    """Score against corruption strength, one panel per corruption family; sources, targets and
    hybrids on one figure (networks solid, hybrids dashed)."""
    plt = _plt()
    fams = table.families()
    fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.4), squeeze=False,
                             sharey=True)
    for ax, (fam, cols) in zip(axes[0], fams.items(), strict=True):
        xs = list(range(len(cols) + 1))
        for r, row in enumerate(table.rows):
            ys = [table.score[r, 0]] + [table.score[r, c] for c in cols]
            hybrid = "→" in row
            ax.plot(xs, ys, ("--" if hybrid else "-") + "o", ms=3, lw=1 if hybrid else 2,
                    label=row, alpha=0.8 if hybrid else 1.0)
        ax.set_xticks(xs, ["clean"] + [table.corruptions[c].split(" ", 1)[-1] for c in cols],
                      rotation=30, fontsize=7)
        ax.set_title(fam, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(table.measure + " (%)")
    axes[0][-1].legend(fontsize=6, loc="lower left", bbox_to_anchor=(1.02, 0.0))
    return _png(fig)
