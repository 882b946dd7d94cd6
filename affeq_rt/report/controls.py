"""The negative controls of an evaluation (``method.controls.ControlTable``) as text, Markdown and
HTML: each real hybrid's score beside its controls', the margins, and the hybrids flagged."""

from __future__ import annotations

import html

import numpy as np

from affeq_rt.method.controls import MEANINGS, ControlTable

TITLE = "Negative controls: is this equivalence real, and how large?"


def _rows(ct: ControlTable) -> list[list[str]]:
    """One row per ordered pair: hybrid, real score, each control's score (margin), verdict."""
    out = []
    for i, a in enumerate(ct.models):
        for j, b in enumerate(ct.models):
            if i == j:
                continue
            row = [f"{a} → {b}", f"{ct.real[i, j]:.1f}"]
            for k in ct.kinds:
                s, m = ct.score[k][i, j], ct.margin[k][i, j]
                own = " own map, not counted" if ct.is_own_map(k, f"{a}->{b}") else ""
                row.append("–" if not np.isfinite(s) else f"{s:.1f} ({m:+.1f}){own}")
            row.append(f"{ct.chance[j]:.1f}")
            row.append("beats its controls" if f"{a}->{b}" not in ct.flagged
                       else "DOES NOT beat chance" if not ct.beats_chance[i, j]
                       else "DOES NOT beat its controls")
            out.append(row)
    return out


def _header(ct: ControlTable) -> list[str]:
    what = "top-1 %" if ct.measure == "top1" else "agreement %"
    return ["hybrid", f"real ({what})", *[f"{k} (margin)" for k in ct.kinds],
            "chance", "verdict"]


def _caption(ct: ControlTable) -> str:
    kinds = "; ".join(f"{k}: {MEANINGS[k]}" for k in ct.kinds)
    return (f"The same {len(ct.models)}×{len(ct.models)} evaluation on {ct.n} images for control "
            f"sources ({kinds}), each map fitted by the real map's own estimator on the same "
            "fitting images and scored through the same target head; a shuffled control that is "
            "the hybrid's own map (the estimator kept its prior on real and on mismatched pairs) "
            "cannot tell them apart and is not counted. Margin = real − control, in points; a "
            "hybrid beats a control (and chance) when the margin exceeds 2 standard errors of "
            "the difference. Chance: the best constant guess for the target (its most frequent "
            f"{'label' if ct.measure == 'top1' else 'prediction'}).")


def controls_text(ct: ControlTable) -> str:
    """Terminal form: the table, then the one line."""
    rows = [_header(ct), *_rows(ct)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*lines, ct.line()])


def controls_markdown(ct: ControlTable) -> str:
    """Markdown section body."""
    rows = [_header(ct), *_rows(ct)]
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return _caption(ct) + "\n\n" + "\n".join(md) + f"\n\n{ct.line()}\n"


def controls_html(ct: ControlTable) -> str:
    """HTML section body."""
    e = html.escape
    rows = _rows(ct)
    head = "".join(f"<th>{e(h)}</th>" for h in _header(ct))
    body = "".join("<tr>" + "".join(
        f"<td><b>{e(v)}</b></td>" if v.startswith("DOES NOT") else f"<td>{e(v)}</td>"
        for v in r) + "</tr>" for r in rows)
    return (f"<p class='note'>{e(_caption(ct))}</p><div class='wide'><table><tr>{head}</tr>"
            f"{body}</table></div><p>{e(ct.line())}</p>")
