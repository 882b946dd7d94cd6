"""``affeq-rt predict`` and ``affeq-rt export`` end to end: real PyPI weights through ONNX on
onnxruntime label scikit-image's photos correctly; every bad input is one line and exit 1."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cli.main import main
from affeq_rt.data.labels import class_name, imagenet_names, topk
from affeq_rt.onnx.runtime import loadable_providers

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (967, 968)  # espresso, cup


def _top1(out: str, image: Path) -> int:
    lines = out.splitlines()
    i = lines.index(str(image))
    return int(lines[i + 1].split()[1])


def _one_line_error(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert needle in err, err
    assert "\n" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize("fixture", ["lite0_export", "mobilenet_v2_export"])
def test_predict_photos_real_weights(fixture: str, request: pytest.FixtureRequest,
                                     photo_files: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    export = request.getfixturevalue(fixture)
    imgs = [photo_files["chelsea"], photo_files["coffee"]]
    assert main(["predict", str(export), *map(str, imgs), "--top", "5"]) == 0
    out = capsys.readouterr().out
    prov = [ln.removeprefix("provider: ") for ln in out.splitlines() if ln.startswith("provider: ")]
    assert len(prov) == 1
    assert prov[0] in loadable_providers()
    assert _top1(out, imgs[0]) in CATS
    assert _top1(out, imgs[1]) in COFFEE
    assert class_name(_top1(out, imgs[0])) in out


def test_predict_by_registry_name_uses_default_root(lite0_export: Path, use_affeq_home: Path,
                                                    photo_files: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert lite0_export.parent == use_affeq_home / "exports"
    stamp = (lite0_export / "features.onnx").stat().st_mtime_ns
    assert main(["predict", "EfficientNet-Lite0", str(photo_files["chelsea"]), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"model: efficientnet_lite0 ({lite0_export})" in out
    assert _top1(out, photo_files["chelsea"]) in CATS
    assert len([ln for ln in out.splitlines() if ln.startswith("  ")]) == 3
    assert (lite0_export / "features.onnx").stat().st_mtime_ns == stamp  # reused, not re-exported


def test_predict_bad_inputs(lite0_export: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    assert main(["predict", str(lite0_export), str(text)]) == 1
    _one_line_error(capsys, "is not a readable image")
    assert main(["predict", str(lite0_export), str(tmp_path / "missing.png")]) == 1
    _one_line_error(capsys, "does not exist")
    assert main(["predict", "efficientnet_lite9", str(text)]) == 1
    _one_line_error(capsys, "closest: ")
    assert main(["predict", str(tmp_path), str(text)]) == 1  # a folder that is no export
    _one_line_error(capsys, "is not an export folder")


def test_export_cli_bad_inputs_write_nothing(tmp_path: Path, lite0_export: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "out"
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage")
    wrong = Path(str(lite0_export)) / "head.safetensors"  # real tensors, wrong architecture
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cases = [
        (["export", "no_such_model", "--out", str(root)], "unknown model"),
        (["export", "lite0", "--weights", str(tmp_path / "missing.pth"), "--out", str(root)],
         "does not exist"),
        (["export", "lite0", "--weights", str(corrupt), "--out", str(root)],
         "cannot be read safely"),
        (["export", "lite0", "--weights", str(wrong), "--out", str(root)], "does not fit"),
        (["export", "lite0", "--random-weights", "--out", str(blocker / "sub")],
         "cannot create output folder"),
        (["export", "lite0", "--random-weights", "--weights", str(wrong), "--out", str(root)],
         "only one"),
    ]
    for argv, needle in cases:
        assert main(argv) == 1, argv
        _one_line_error(capsys, needle)
    assert not root.exists() or not any(root.iterdir())
    assert blocker.read_text() == "x"


def test_export_cli_writes_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "mobilenetv2", "--random-weights", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"exported mobilenet_v2 to {tmp_path / 'mobilenet_v2'}" in out
    assert "export error" in out
    assert sorted(p.name for p in (tmp_path / "mobilenet_v2").iterdir()) == [
        "classifier.onnx", "features.onnx", "head.safetensors", "manifest.json"]


HEAVY = ("torch", "torchvision", "timm")
_LIST_HEAVY = ("import sys; from affeq_rt.cli.main import main; rc = main(sys.argv[1:]); "
               "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})); "
               "sys.exit(rc)")


def _heavy_modules(*argv: str) -> list[str]:
    """Run the CLI in a fresh interpreter; the torch/timm modules it had imported at the end."""
    r = subprocess.run([sys.executable, "-c", _LIST_HEAVY.format(heavy=HEAVY), *argv],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("HEAVY "))
    return ast.literal_eval(line.removeprefix("HEAVY "))


@pytest.mark.usefixtures("use_affeq_home")
def test_predict_on_a_cached_export_imports_neither_torch_nor_timm(
        lite0_export: Path, photo_files: dict[str, Path]) -> None:
    """Class names and specs come from the package and the export's own files, so classifying
    with an export (a folder, or a registry name whose export is cached) never loads torch or
    timm (issue 25: they were 80 % of predict's start-up); neither does --help."""
    img = str(photo_files["chelsea"])
    assert _heavy_modules("predict", str(lite0_export), img) == []
    assert _heavy_modules("predict", "efficientnet_lite0", img) == []
    assert _heavy_modules("--help") == []


def test_packaged_class_names_are_timms() -> None:
    """imagenet_classes.txt is timm's ImageNet-1k table, copied (timm is not imported for it)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert imagenet_names() == tuple(info.index_to_description(i) for i in range(1000))


def test_labels_and_offset() -> None:
    names = imagenet_names()
    assert len(names) == 1000
    assert "tabby" in names[281]
    assert "espresso" in names[967]
    z = np.zeros((2, 1001))
    z[0, 282], z[1, 968] = 5.0, 7.0  # 1001-class (TF-slim) logits: index c+1 is class c
    res = topk(z, k=3, label_offset=1)
    assert res[0].indices[0] == 281
    assert res[1].indices[0] == 967
    assert res[0].names[0] == names[281]
    assert abs(sum(topk(z[:1], 1000, 1)[0].probs) - 1) < 1e-9
    ties = topk(np.zeros((1, 10)), k=3)
    assert ties[0].indices == (0, 1, 2)  # ties go to the lower index


# ------------------------------------------------------------------------------ hybrid models


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from test_hybrid import TinyParts

    return TinyParts(tmp_path_factory.mktemp("predict_parts"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter
@pytest.mark.parametrize("in_graph", [False, True], ids=["float-nchw", "uint8-nhwc"])
def test_predict_hybrid_uses_its_recorded_preprocessing(
        tiny_parts, in_graph: bool, tmp_path: Path, photo_files: dict[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The hybrid records A's preprocessing (here a crop and filter no other spec uses); predict
    must apply exactly that: its logits equal C_B(M·F_A(x)) computed in torch on images
    preprocessed with the recorded spec, and differ from any other preprocessing's."""
    from dataclasses import replace

    from affeq_rt.data.preprocess import load_image, preprocess
    from affeq_rt.deploy.predict import predict

    spec_a = replace(tiny_parts.spec_a, crop_pct=0.6, interpolation="bicubic")
    out = tiny_parts.build(tmp_path / "h.onnx", spec_a=spec_a, with_preprocessing=in_graph)
    files = [photo_files["chelsea"], photo_files["coffee"], photo_files["rocket"]]
    pred = predict(out, files, top=3, provider="cpu")
    imgs = [load_image(f) for f in files]

    def expected(spec) -> np.ndarray:
        return tiny_parts.expected_logits(np.stack([preprocess(im, spec) for im in imgs]))

    ref = expected(spec_a)
    scale = float(np.abs(ref).max())
    # float32 ONNX graph vs the float64 torch/NumPy reference of the same arithmetic: the hybrid
    # is verified to 1e-4 of the logit scale (TOL_FP32), JPEG decoding is identical on both sides.
    assert np.abs(pred.logits - ref).max() <= 1e-4 * scale
    # The check can tell preprocessings apart: the builder's default spec for A (crop 0.875,
    # bilinear) and B's spec (other mean/std) move the logits by far more than the tolerance.
    for other in (tiny_parts.spec_a, tiny_parts.spec_b):
        assert np.abs(expected(other) - ref).max() > 100 * 1e-4 * scale
    assert pred.name == "tiny_a->tiny_b hybrid"
    assert pred.path == out
    top = [r.indices[0] for r in pred.results]
    assert top == list(ref.argmax(1))
    assert pred.results[0].names[0] == str(top[0])
    assert main(["predict", str(out), str(files[0]), "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"model: tiny_a->tiny_b hybrid ({out})" in printed
    assert _top1(printed, files[0]) == top[0]


def test_predict_hybrid_bad_inputs(tmp_path: Path, photo_files: dict[str, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    assert main(["predict", str(tmp_path / "missing.onnx"), str(photo_files["chelsea"])]) == 1
    _one_line_error(capsys, "does not exist")
    plain = tmp_path / "plain.onnx"  # a valid ONNX model that is no affeq-rt hybrid
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(plain))
    assert main(["predict", str(plain), str(photo_files["chelsea"])]) == 1
    _one_line_error(capsys, "is not a hybrid built by affeq-rt")


@pytest.mark.slow
@pytest.mark.usefixtures("lite0_export", "mobilenet_v2_export")
def test_build_hybrid_then_predict_a_cat(tmp_export_root: Path, tmp_path: Path,
                                         photo_files: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """issue 9's must-show: ``build-hybrid --src efficientnet_lite0 --dst mobilenet_v2 --fit-on
    PHOTOS --out h.onnx`` then ``predict h.onnx chelsea.jpg`` prints a cat as top-1.

    PHOTOS: scikit-image's photos and crops/flips of them, saved as JPEG (the fit uses no labels).
    """
    from PIL import ImageOps

    from affeq_rt.data.preprocess import sample_photo

    names = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry",
             "hubble_deep_field", "colorwheel", "retina", "camera", "coins", "moon", "clock",
             "text", "page", "brick", "grass", "gravel", "cell")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        img = sample_photo(name)
        img.save(photos / f"{name}.jpg", quality=95)
        w, h = img.size
        for k in range(8):
            f = rng.uniform(0.5, 1.0)
            cw, ch = int(f * w), int(f * h)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            v = img.crop((x0, y0, x0 + cw, y0 + ch))
            (ImageOps.mirror(v) if k % 2 else v).save(photos / f"{name}_{k}.jpg", quality=95)
    out = tmp_path / "h.onnx"
    assert main(["build-hybrid", "--src", "efficientnet_lite0", "--dst", "mobilenet_v2",
                 "--fit-on", str(photos), "--out", str(out),
                 "--export-root", str(tmp_export_root)]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), str(photo_files["chelsea"])]) == 0
    printed = capsys.readouterr().out
    assert "efficientnet_lite0->mobilenet_v2 hybrid" in printed
    assert _top1(printed, photo_files["chelsea"]) in CATS, printed
