"""Layer views: one feature map per stage chosen from the graph's run-time shapes, the last one
equal to the spatial map CAM uses, named layers checked, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affeq_rt.cli.main import main
from affeq_rt.data.preprocess import load_image, preprocess
from affeq_rt.errors import AffeqError
from affeq_rt.method.extract import ImageOptions
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.spatial import open_spatial
from affeq_rt.vis.layers import layers

CPU = ImageOptions(provider="cpu")


@pytest.fixture(scope="module")
def resnet_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's small residual net, untrained (fixed seed), exported: stem 14×14, block 7×7."""
    import torch

    from affeq_rt.demo import digits
    from affeq_rt.onnx.export import export_split

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vis_layers")
    return export_split(digits.build("resnet_small").eval(), digits.spec_for("resnet_small"),
                        root / "digits_resnet_small")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 40×40 colour image with a bright square."""
    a = np.zeros((40, 40, 3), np.uint8)
    a[8:24, 10:30] = (250, 200, 40)
    p = tmp_path / "square.png"
    Image.fromarray(a).save(p)
    return p


def test_one_layer_per_stage(resnet_small: Path, image: Path, tmp_path: Path) -> None:
    """Stages 14×14 then 7×7; the last is spatial.onnx's map (the GAP input) to rounding; the
    strongest channels are sorted by mean activation; PNG/HTML/JSON written."""
    res = layers(resnet_small, image, out=tmp_path / "o", channels=4, options=CPU)
    assert [v.shape[1:] for v in res.layers] == [(14, 14), (7, 7)]
    last = res.layers[-1]
    exp = ExportedBackbone(resnet_small)
    sp, _ = open_spatial(exp, "cpu").run(preprocess(load_image(image), exp.spec)[None])
    assert last.shape == sp.shape[1:]
    # same tensor, but another session: requesting intermediate outputs changes ORT's kernel
    # fusion, so float32 rounding differs (measured 2e-8 on values ~0.1; a 3x3x48 = 432-term
    # float32 dot product can round by 432 * 2^-24 = 2.6e-5 of its terms' magnitude)
    ref = sp[0].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(last.mean, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    means = sp[0].astype(np.float64).mean(axis=(1, 2))
    assert last.channels == [int(c) for c in np.argsort(-means, kind="stable")[:4]]
    doc = json.loads((tmp_path / "o" / "layers.json").read_text())
    assert len(doc["layers"]) == 2
    assert (tmp_path / "o" / "layers.png").stat().st_size > 5_000


def test_named_layer_and_errors(resnet_small: Path, image: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    """A named layer is used as given; an unknown one and an unreadable image are one line."""
    first = layers(resnet_small, image, options=CPU).layers[0].name
    res = layers(resnet_small, image, names=[first], options=CPU)
    assert [v.name for v in res.layers] == [first]
    with pytest.raises(AffeqError, match="closest"):
        layers(resnet_small, image, names=[first + "x"], options=CPU)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["layers", str(resnet_small), str(bad), "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not a readable image" in err[0]
    assert main(["layers", "--help"]) == 0
