"""The demo's layer-by-layer section (issue 26) on the digits miniature: each trained network's
stages exported (``onnx.stages``, from the weights the demo saved), stage stores of the training
and held-out digits, and ``method.depth.layer_analysis`` of resnet_small ↔ inception_small: the
stage × stage CKA and both depth curves, whose last points are the OLS hybrids of the table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.demo import digits
from affeq_rt.io.heads import load_head
from affeq_rt.io.store import ArrayStore
from affeq_rt.method.depth import LayerAnalysis, layer_analysis
from affeq_rt.method.fit import FitOptions
from affeq_rt.method.stages import stage_spec
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.stages import ensure_stages, export_stages, stage_model
from affeq_rt.report.depth import depth_report_section, write_depth

PAIR = ("resnet_small", "inception_small")


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
    return la, depth_report_section(la)
