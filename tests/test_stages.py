"""Pooled stage features (issue 26): stages.onnx against the framework for a CNN with real
weights (EfficientNet-Lite0) and a vision transformer (random weights), and ``models NAME``.

The reference is timm's own ``forward_intermediates`` (NCHW maps, a ViT's prefix tokens dropped),
averaged over h×w in float64: not the module stages.onnx was traced from. Tolerance: both runtimes
compute in float32 (u = 6e-8) and differ only in the order of each op's sums; reordering a K-term
sum moves it by about √K·u relative (K ≤ 3·3·320 = 2,880 in Lite0, 768 in ViT-Tiny's MLP: ≤ 3e-6
per layer), and errors compound roughly additively over ≤ 20 layers to ~1e-5 at most; averaging
over h×w does not enlarge it (measured 1e-7 … 1e-6). 1e-4 stays 10× above that, while a wrong
stage, a pool that keeps the class token (6e-3 on ViT-Tiny) or features from other weights are
off by ≥ 1e-3.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STAGE_RTOL = 1e-4


def _check_against_timm(export: Path, random_weights: bool) -> list[str]:
    import torch

    from affeq_rt.model.build import build_with_info
    from affeq_rt.onnx.export import check_inputs
    from affeq_rt.onnx.exported import ExportedBackbone
    from affeq_rt.onnx.stages import ensure_stages

    exp = ExportedBackbone(export)
    sm = ensure_stages(exp, provider="cpu")
    x, _ = check_inputs(exp.spec)
    got = sm.run(x)
    model, _ = build_with_info(exp.spec, None, random_weights)
    with torch.no_grad():
        maps = model.forward_intermediates(torch.from_numpy(x), intermediates_only=True,
                                           indices=list(range(len(model.feature_info))))
        feats = model.forward_head(model.forward_features(torch.from_numpy(x)),
                                   pre_logits=True).double().numpy()
    assert len(maps) == len(sm.stages)
    for s, t in zip(sm.stages, maps, strict=True):
        ref = t.double().mean(dim=(2, 3)).numpy()
        assert got[s.name].shape == ref.shape == (len(x), s.dim)
        err = np.abs(got[s.name] - ref).max() / np.abs(ref).max()
        assert err <= STAGE_RTOL, (s, err)
    err = np.abs(got["features"] - feats).max() / np.abs(feats).max()
    assert err <= STAGE_RTOL
    return [s.module for s in sm.stages]


def test_lite0_stages_match_timm(lite0_export: Path) -> None:
    modules = _check_against_timm(lite0_export, random_weights=False)
    assert modules == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]


@pytest.mark.slow
def test_vit_stages_match_timm(tmp_export_root: Path) -> None:
    from affeq_rt.onnx.export import ensure_exported

    exp = ensure_exported("vit_tiny_patch16_224", root=tmp_export_root, random_weights=True)
    modules = _check_against_timm(exp.path, random_weights=True)
    assert modules == [f"blocks.{i}" for i in range(12)]


def test_stages_reused_and_rebuilt_when_features_change(lite0_export: Path) -> None:
    from affeq_rt.io.fsio import sha256_file
    from affeq_rt.onnx.exported import ExportedBackbone
    from affeq_rt.onnx.stages import STAGES_FILE, read_stages

    exp = ExportedBackbone(lite0_export)
    path = exp.path / STAGES_FILE
    if not path.is_file():
        pytest.skip("runs after the Lite0 stages test")
    assert read_stages(path, sha256_file(exp.features_path)) is not None
    assert read_stages(path, "0" * 64) is None  # another features.onnx: rebuilt, not reused


def test_models_lists_stages() -> None:
    r = subprocess.run([sys.executable, "-m", "affeq_rt", "models", "resnet50"],
                       capture_output=True, text=True, check=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("stage ")]
    assert [ln.split()[2] for ln in lines] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert "resnet50@s5" in lines[-1]
    assert "2048" in lines[-1]
