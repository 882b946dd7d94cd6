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


# ------------------------------------------------------------ pipelines (issue 25)

def _photo_jpeg(tmp_path, name: str = "chelsea", portrait: bool = False):
    """A scikit-image photo as a JPEG; ``portrait``: its middle 3:4 (portrait) part."""
    im = Image.fromarray(getattr(skdata, name)())
    if portrait:
        w, h = im.size
        cw = min(w, h * 3 // 4)
        im = im.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, cw * 4 // 3))
    p = tmp_path / f"{name}_{im.size[0]}x{im.size[1]}.jpg"
    im.save(p, quality=95)
    return p


def test_normalize_batch_is_bit_identical_to_normalize() -> None:
    """One vectorised pass per batch, the same float32 operations in the same order as the
    per-image ``normalize``: every element equal, not just close."""
    from affeq_rt.data.preprocess import normalize, normalize_batch

    rng = np.random.default_rng(0)
    for spec in SPECS:
        s = spec.input_size
        u8 = rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8)
        want = np.stack([normalize(a, spec.mean, spec.std) for a in u8])
        got = normalize_batch(u8, spec)
        assert got.dtype == np.float32
        assert got.shape == (3, 3, s, s)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(InternalError):
        normalize_batch(u8.astype(np.float32), SPECS[0])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.input_size}-{s.interpolation}")
def test_pillow_pipeline_is_within_two_levels_of_exact(tmp_path, spec: Preprocessing) -> None:
    """Resizing only the crop's region uses the same filter taps as resizing the whole image;
    only the float rounding of each tap's centre (region start + (i + ½)·scale instead of
    (i + left + ½)·scale) differs. That can flip the uint8 rounding of Pillow's horizontal pass
    by one level; the vertical pass scales it by its taps' absolute sum (≤ 1.14 for the bicubic
    kernel, 1 for bilinear) before its own rounding: at most 2 levels apart."""
    from affeq_rt.data.preprocess import crop, prepare_crops

    for name, portrait in (("chelsea", False), ("coffee", False), ("rocket", False),
                           ("chelsea", True), ("astronaut", True)):
        p = _photo_jpeg(tmp_path, name, portrait=portrait)
        (got,) = prepare_crops(str(p), [spec], "pillow")
        want = crop(load_image(p), spec)
        assert got.shape == want.shape == (spec.input_size, spec.input_size, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_pillow_pipeline_downscales_large_jpegs_in_the_dct_with_the_same_geometry(
        tmp_path) -> None:
    """A JPEG ≥ 4× the resize target is decoded at 1/2–1/8 size (libjpeg's scaled IDCT), but the
    crop is the exact pipeline's: a bright disc lands where it does there. Both paths filter
    symmetrically, so the disc's intensity centroid is preserved up to the discretisation of a
    ~40-pixel disc (far below 0.2 output pixels); mapping the crop box with a one-pixel error at
    the reduced scale would move it by 2–8 source pixels ≈ 0.25–1 output pixel."""
    from affeq_rt.data.preprocess import DRAFT_KEY, crop, prepare_crops

    w, h = 2400, 1800
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - 1318.0) ** 2 + (yy - 811.0) ** 2 < 90.0 ** 2)
    arr = np.where(disc, 230, 40).astype(np.uint8)
    p = tmp_path / "disc.jpg"
    Image.fromarray(np.dstack([arr] * 3)).save(p, quality=95)
    spec = SPECS[0]  # short side to 256: 1800 / 256 ≈ 7 ≥ 2·DRAFT_MARGIN → 1/2 scale decode
    img = load_image(p, draft_short_side=256)
    assert img.info[DRAFT_KEY] == (2, w, h)
    assert img.size == (1200, 900)

    def centroid(a: np.ndarray) -> np.ndarray:
        m = a[..., 0].astype(float) - 40.0
        m[m < 0] = 0
        ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]]
        return np.array([(xs * m).sum(), (ys * m).sum()]) / m.sum()

    (got,) = prepare_crops(str(p), [spec], "pillow")
    want = crop(load_image(p), spec)
    assert np.abs(centroid(got) - centroid(want)).max() < 0.2


def test_torchvision_pipeline_is_within_two_levels_of_exact(tmp_path) -> None:
    """torchvision's decode is libjpeg-turbo like Pillow's (bit-identical here: issue 25);
    torch's uint8 antialiased resize runs Pillow's two passes with the same taps and the same
    uint8 rounding between them, but with int16 weights (≈ 15 fractional bits, Pillow's 22):
    that can flip the first pass's rounding by one level, which the vertical taps' absolute sum
    (≤ 1.14 bicubic, 1 bilinear) carries into the second before its own rounding flip: at most
    2 levels apart. Files it does not take (PNG) follow the Pillow route."""
    from affeq_rt.data.preprocess import crop, prepare_crops, resolve_pipeline

    pytest.importorskip("torchvision")
    assert resolve_pipeline("fast") == "torchvision"
    for spec in SPECS[:2]:  # bicubic and bilinear
        for name in ("chelsea", "coffee"):
            p = _photo_jpeg(tmp_path, name)
            (got,) = prepare_crops(str(p), [spec], "torchvision")
            want = crop(load_image(p), spec)
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    png = tmp_path / "coffee.png"
    Image.fromarray(skdata.coffee()).save(png)
    np.testing.assert_array_equal(prepare_crops(str(png), [SPECS[0]], "torchvision")[0],
                                  prepare_crops(str(png), [SPECS[0]], "pillow")[0])


@pytest.mark.parametrize("pipeline", ["pillow", "torchvision"])
def test_fast_pipelines_keep_the_errors_and_bounds(tmp_path, pipeline: str) -> None:
    """Unreadable, truncated and degenerate files are the same one-line AffeqErrors on every
    pipeline (the fast routes fall back to Pillow's decode for the message)."""
    from affeq_rt.data.preprocess import prepare_crops, resolve_pipeline

    if pipeline == "torchvision":
        pytest.importorskip("torchvision")
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image")
    with pytest.raises(AffeqError, match="notes.jpg is not a readable image"):
        prepare_crops(str(txt), SPECS[:1], pipeline)
    data = _photo_jpeg(tmp_path).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(AffeqError, match="cut.jpg"):
        prepare_crops(str(tmp_path / "cut.jpg"), SPECS[:1], pipeline)
    Image.new("RGB", (3, 3), (1, 2, 3)).save(tmp_path / "dot.jpg")
    with pytest.raises(AffeqError, match=r"dot.jpg is 3×3 pixels: .* enlarged 85 times"):
        prepare_crops(str(tmp_path / "dot.jpg"), SPECS[:1], pipeline)
    with pytest.raises(AffeqError, match="unknown preprocessing pipeline 'quick'"):
        resolve_pipeline("quick")
