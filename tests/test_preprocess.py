"""preprocess.py against timm's own eval transform on real photos, and image-mode conversion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from affeq_rt.data.preprocess import load_image, preprocess, preprocess_key, to_rgb
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.registry.spec import Preprocessing, get_spec

skdata = pytest.importorskip("skimage.data")

SPECS = [
    Preprocessing(input_size=224, crop_pct=0.875, interpolation="bicubic",
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    Preprocessing(input_size=299, crop_pct=0.8975, interpolation="bilinear",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    Preprocessing(input_size=331, crop_pct=0.911, interpolation="bicubic",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.input_size}-{s.interpolation}")
@pytest.mark.parametrize("photo", ["chelsea", "coffee", "rocket"])
def test_matches_timm_eval_transform(spec: Preprocessing, photo: str) -> None:
    from timm.data import create_transform

    img = Image.fromarray(getattr(skdata, photo)())
    ours = preprocess(img, spec)
    tf = create_transform(input_size=(3, spec.input_size, spec.input_size), is_training=False,
                          crop_pct=spec.crop_pct, interpolation=spec.interpolation,
                          mean=spec.mean, std=spec.std)
    ref = tf(img).numpy()
    assert ours.shape == ref.shape == (3, spec.input_size, spec.input_size)
    assert ours.dtype == np.float32
    # Same PIL resize and crop; only float rounding of the normalisation differs.
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_modes_convert_to_rgb(tmp_path) -> None:
    rgb = skdata.astronaut()[:64, :64]
    gray = Image.fromarray(rgb[..., 0])
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 0, np.uint8)]))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert to_rgb(gray).mode == "RGB"
    # Fully transparent pixels composite to white.
    assert np.all(np.asarray(to_rgb(rgba)) == 255)
    cmyk.save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").mode == "RGB"


def test_non_image_and_truncated_files_raise(tmp_path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(AffeqError, match="not a readable image"):
        load_image(txt)
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.jpg")
    data = (tmp_path / "cat.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(AffeqError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(AffeqError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_preprocess_key_groups_equal_specs() -> None:
    lite0 = get_spec("efficientnet_lite0")
    assert preprocess_key(lite0) == lite0.preprocessing == Preprocessing.from_dict(lite0.to_dict())
    assert preprocess_key(SPECS[0]) != preprocess_key(SPECS[1])
    with pytest.raises(InternalError):  # the JSON form is for file edges only
        preprocess_key(lite0.to_dict())
    with pytest.raises(AffeqError, match="crop_pct"):
        Preprocessing.from_dict({**lite0.to_dict(), "crop_pct": 1.5})


# ------------------------------------------------------------ bounded work per image (issue 10)

def test_a_one_pixel_line_is_refused_before_any_resize(tmp_path) -> None:
    """The issue's 118-byte 1×20000 PNG: before, preprocessing scaled it to 256×5 120 000 RGB
    (≈ 3.9 GB) before cropping; now a one-line error naming the file, before the decode."""
    Image.new("L", (1, 20000), 128).save(tmp_path / "line.png")
    assert (tmp_path / "line.png").stat().st_size < 1000
    with pytest.raises(AffeqError) as e:
        preprocess(load_image(tmp_path / "line.png"), SPECS[0])
    assert "line.png is 1×20000 pixels" in str(e.value)
    assert "\n" not in str(e.value)


def test_upscale_and_output_size_guards_name_the_file(tmp_path) -> None:
    from affeq_rt.data.preprocess import MAX_RESIZE_PIXELS, resize_crop

    Image.new("RGB", (3, 3), (1, 2, 3)).save(tmp_path / "dot.png")  # 3 px → 256: ×85
    with pytest.raises(AffeqError, match=r"dot.png is 3×3 pixels: .* enlarged 85 times"):
        preprocess(load_image(tmp_path / "dot.png"), SPECS[0])
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "ok.png")  # ×64: still allowed
    assert preprocess(load_image(tmp_path / "ok.png"), SPECS[0]).shape == (3, 224, 224)
    # the output check: 100×3200 is within the aspect limit, but a 2000-px geometry would
    # resize it to 2000×64000 pixels
    Image.new("RGB", (100, 3200)).save(tmp_path / "tall.png")
    img = load_image(tmp_path / "tall.png")
    assert MAX_RESIZE_PIXELS < 2000 * 64000
    with pytest.raises(AffeqError, match=r"tall.png \(100×3200 pixels\) would resize to "
                                         r"2000×64000"):
        resize_crop(img, 2000, 1.0, "bilinear")


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch) -> None:
    """PIL's own bomb limit (lowered here so the test file stays small) is an AffeqError."""
    Image.new("RGB", (300, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)  # 4× over: PIL's error
    with pytest.raises(AffeqError, match="bomb.png is too large to decode safely"):
        load_image(tmp_path / "bomb.png")
