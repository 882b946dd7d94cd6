"""Registry: the thesis's ten networks and the rest resolve by name/alias, and every spec agrees
with the library's own pretrained config and architecture."""

from __future__ import annotations

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
