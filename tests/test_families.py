"""Split export for every architecture family resolved from timm/torchvision (issue 14).

Each export is checked here independently of the exporter's own check: the test rebuilds the
same seeded random-weight network in torch and compares onnxruntime's classifier(features(x))
and features(x) with it on photos and noise. Tolerance: ``EXPORT_RTOL`` = 1e-3 relative to the
largest logit (or feature). Both sides compute the same float32 network, differing only in
summation order and fused kernels, which we measure at ≈1e-6 for every family below (ViT's
attention and LayerNorms included); a wrong split (a missing head norm, the wrong token, a
dropped pooling) is off by 1e-1 or more, so 1e-3 separates the two by two orders of magnitude
either way. Random heads that the architecture zero-initialises (MLP-Mixer, torchvision ViT) are
given seeded weights by ``build_with_info``; the feature comparison does not depend on that.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.errors import AffeqError
from affeq_rt.model.build import build_model
from affeq_rt.model.split import check_split, split_model
from affeq_rt.onnx.export import EXPORT_RTOL, check_inputs, ensure_exported
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import get_spec

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore::UserWarning", "ignore::FutureWarning")

FAST = ["regnety_002", "deit_tiny_patch16_224"]  # the two cheapest families (RegNet, DeiT)
SLOW = ["convnext_tiny", "vit_small_patch16_224", "swin_tiny_patch4_window7_224",
        "mixer_s16_224", "efficientnet_b0", "torchvision/resnet18", "levit_128s",
        "mobilenetv3_small_100", "tv_vit_b_16"]


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def check_family_export(name: str, root: Path) -> dict:
    """Export ``name`` with random weights, then compare onnxruntime with torch independently."""
    spec = get_spec(name)
    t0 = time.perf_counter()
    folder = ensure_exported(name, root=root, random_weights=True).path
    seconds = time.perf_counter() - t0
    manifest = json.loads((folder / "manifest.json").read_text())
    err = manifest["export_error"]
    assert err["tolerance"] == EXPORT_RTOL
    model = build_model(spec, random_weights=True)  # seeded: the very network exported
    x, names = check_inputs(spec, n_noise=1)
    x = x[[0, 1, -1]]  # chelsea, coffee, noise
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).double().numpy()
        ref_feats = split_model(model)[0](torch.from_numpy(x)).double().numpy()
    feats = create_session(folder / "features.onnx", provider="cpu").run(x)
    logits = create_session(folder / "classifier.onnx", provider="cpu").run(feats)
    assert feats.shape == (3, spec.feature_dim)
    assert logits.shape == (3, spec.num_classes)
    assert np.abs(ref).max() > 0, "constant logits would make the comparison vacuous"
    measured = {"logits": rel(logits.astype(np.float64), ref),
                "features": rel(feats.astype(np.float64), ref_feats)}
    print(f"{spec.name}: export {seconds:.1f}s, manifest {err['max_rel']:.2e}, "
          f"independent logits {measured['logits']:.2e} features {measured['features']:.2e}")
    for value in (*measured.values(), err["max_rel"], err["features_max_rel"],
                  err["split_max_rel"]):
        assert 0 <= value <= EXPORT_RTOL
    return manifest


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("family_exports")


@pytest.mark.parametrize("name", FAST)
def test_family_export_fast(name: str, family_root: Path) -> None:
    manifest = check_family_export(name, family_root)
    assert manifest["spec"]["name"] == name
    assert manifest["weights"]["source"] == "random"
    if name.startswith("deit"):
        check_deit_features_are_the_normed_class_token()


def check_deit_features_are_the_normed_class_token() -> None:
    """The family rule itself: a DeiT's features are its class token after the final norm, so
    the classifier is applied to exactly what the network classifies."""
    spec = get_spec("deit_tiny_patch16_224")
    model = build_model(spec, random_weights=True)
    x = torch.from_numpy(check_inputs(spec, n_noise=1)[0][-1:])
    feats, head = split_model(model)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [1, 197, 192], model.norm applied
        assert tokens.shape == (1, 197, 192)
        np.testing.assert_array_equal(feats(x).numpy(), tokens[:, 0].numpy())
        np.testing.assert_allclose(head(feats(x)).numpy(), model(x).numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_wrong_split_is_refused(tmp_path: Path) -> None:
    """A network that is not its classifier over its pre-logits (here: logits plus a term the
    pre-logits do not carry) is refused by check_split, and export_split writes nothing."""
    from affeq_rt.onnx.export import export_split
    from affeq_rt.registry.spec import BackboneSpec, WeightsSource

    class Skewed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Conv2d(3, 8, 3)
            self.fc = torch.nn.Linear(8, 5)

        def forward_features(self, x):
            return self.body(x)

        def forward_head(self, x, pre_logits: bool = False):
            pooled = x.mean((2, 3))
            return pooled if pre_logits else self.fc(pooled) + x.amax((1, 2, 3))[:, None]

        def get_classifier(self):
            return self.fc

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    torch.manual_seed(0)
    model = Skewed().eval()
    x = torch.randn(2, 3, 16, 16)
    feats, head = split_model(model)
    spec = BackboneSpec("skewed", "affeq", "skewed", WeightsSource(), 16, 1.0, "bilinear",
                        (0.5,) * 3, (0.5,) * 3, feature_dim=8, num_classes=5)
    with pytest.raises(AffeqError, match="cannot be split exactly"):
        export_split(model, spec, tmp_path / "skewed", inputs=(x.numpy(), ["noise:0", "noise:1"]))
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():
        with pytest.raises(AffeqError, match="cannot be split exactly"):
            check_split("Skewed", model(x), head(feats(x)), EXPORT_RTOL)
        model.forward_head = lambda t, pre_logits=False: (  # the honest network passes
            t.mean((2, 3)) if pre_logits else model.fc(t.mean((2, 3))))
        assert check_split("Skewed", model(x), head(feats(x)), EXPORT_RTOL) < 1e-6


@pytest.mark.parametrize(("name", "reason"), [
    ("deit_tiny_distilled_patch16_224", "two different tokens"),
    ("volo_d1_224", "max over its tokens"),
])
def test_unsplittable_timm_families_refused(name: str, reason: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):
        from affeq_rt.model.build import build_arch

        model = build_arch(spec, random_init=False)
    with pytest.raises(AffeqError, match=reason) as e:
        split_model(model)
    assert "\n" not in str(e.value)


def test_squeezenet_refused_at_resolution() -> None:
    with pytest.raises(AffeqError, match="no Linear layer"):
        get_spec("torchvision/squeezenet1_0")


def test_levit_norm_linear_heads_fold_exactly() -> None:
    """LeViT's classifier is BatchNorm1d + Linear, and its distilled variant averages two of them
    over the same vector: as_linear folds both into one Linear (float64), equal to float32
    rounding. (The whole levit_128s network is exported in the slow test.)"""
    from timm.models.levit import NormLinear

    from affeq_rt.model.split import as_linear

    torch.manual_seed(0)
    heads = [NormLinear(16, 5).eval(), NormLinear(16, 5).eval()]
    for h in heads:  # non-trivial running statistics and affine terms, else the fold is trivial
        h.bn.running_mean.uniform_(-1, 1)
        h.bn.running_var.uniform_(0.5, 2)
        h.bn.weight.data.uniform_(0.5, 2)
        h.bn.bias.data.uniform_(-1, 1)
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = (heads[0](x) + heads[1](x)) / 2
        one = as_linear(heads[0], "head")
        both = as_linear(tuple(heads), "head")
        assert isinstance(one, torch.nn.Linear)
        assert check_split("levit", heads[0](x), one(x), EXPORT_RTOL) < 1e-6
        assert check_split("levit", want, both(x), EXPORT_RTOL) < 1e-6


@pytest.mark.parametrize(("name", "rule"), [
    ("convformer_s18", "MetaFormer MlpHead: fc1/act/norm in the features, fc2 the head"),
    ("repvit_m0_9", "RepViT BatchNorm+Linear heads (distilled pair) fused by timm's fuse()"),
    ("sequencer2d_s", "get_classifier() is a ClassifierHead: its fc"),
])
def test_head_module_rules_split_exactly(name: str, rule: str) -> None:
    """Torch only, at 64×64 (convolutional and recurrent stems take any size; the rule does not
    depend on it): head(features(x)) equals the network's logits, so the rule holds."""
    from affeq_rt.model.build import build_with_info

    spec = get_spec(name)
    model, _ = build_with_info(spec, random_weights=True)
    for m in model.modules():  # running statistics away from (0, 1): a fold must really fold
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    feats, head = split_model(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = feats(x)
        assert f.shape == (2, spec.feature_dim), rule
        assert check_split(name, model(x), head(f), EXPORT_RTOL) < 1e-5, rule


# ------------------------------------------------------------------------------ slow: every family

@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_family_export_slow(name: str, family_root: Path) -> None:
    check_family_export(name, family_root)


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() is not None and os.cpu_count() < 2, reason="needs 2 cores")
def test_vit_to_convnext_hybrid_builds_verifies_serves(family_root: Path,
                                                        tmp_path: Path) -> None:
    """A ViT's class-token features through an OLS map into ConvNeXt's classifier (random
    weights, fitted on photo views): builds, verifies against its parts, serves the same logits."""
    pytest.importorskip("kserve")
    from test_hybrid import write_photo_views
    from test_serve import direct, infer, served

    from affeq_rt.deploy.from_names import FitOn, hybrid
    from affeq_rt.deploy.hybrid import HybridOptions
    from affeq_rt.deploy.metadata import read_metadata
    from affeq_rt.method.extract import ImageOptions

    views = write_photo_views(tmp_path / "views", n_per=1)
    out = hybrid("vit_small_patch16_224", "convnext_tiny", fit_on=FitOn(views, "ols"),
                 out=tmp_path / "vit2convnext.onnx",
                 options=HybridOptions(server_repo=tmp_path / "repo"),
                 images=ImageOptions(random_weights=True, export_root=family_root))
    meta = read_metadata(out)["metadata"]
    assert (meta["source"], meta["target"]) == ("vit_small_patch16_224", "convnext_tiny")
    assert meta["verification"]["max_rel"] <= meta["verification"]["tolerance"]
    print(f"hybrid verification max_rel {meta['verification']['max_rel']:.2e} "
          f"(tolerance {meta['verification']['tolerance']:g})")
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    name = "vit_small_patch16_224_to_convnext_tiny"
    with served(tmp_path / "repo", tmp_path / "server.log", name=name, timeout=300) as client:
        got = infer(client, name, x)
    want = direct(out, x)["logits"]
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(got["logits"], want)


def test_original_layout_timm_checkpoint_loads_through_timm_filter(tmp_path: Path) -> None:
    """A checkpoint in the authors' layout (Facebook's ConvNeXt keys) loads strictly into the
    resolved timm architecture through the module's checkpoint_filter_fn, as timm loads it."""
    import re

    from safetensors.torch import save_file

    from affeq_rt.model.build import build_with_info

    spec = get_spec("convnext_atto")
    state = build_model(spec, random_weights=True).state_dict()
    fb = {}
    for k, v in state.items():  # timm → FB names (the inverse of timm's filter)
        k2 = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k2 = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k2)
        k2 = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k2)
        k2 = k2.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k2 = k2.replace("head.fc.", "head.").replace("head.norm.", "norm.")
        fb[k2] = v.contiguous()
    assert set(fb).isdisjoint(state)
    path = tmp_path / "convnext_atto_fb.safetensors"
    save_file(fb, path)
    model, info = build_with_info(spec, weights=path)
    assert info["source"] == f"file:{path.resolve()}"
    got = model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
