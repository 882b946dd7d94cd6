"""The ``nvjpeg`` pipeline (issue 25 item 3): its resize and routing on the CPU, and on CUDA.

The resize and crop (``crop_tensor``) run on any torch device, so on the CPU they are checked to the
bit against ``exact``; the loader's GPU route is run on the CPU by decoding with torchvision's CPU
``decode_jpeg`` (libjpeg-turbo, bit-identical to Pillow's decode), which makes the whole pipeline
equal to ``exact`` there. The ``gpu``-marked tests run on a CUDA GPU (scripts/gpu-check.sh).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affeq_rt.data import gpu_decode as gd
from affeq_rt.data.loader import iter_batches
from affeq_rt.data.preprocess import crop, load_image, prepare_crops, resolve_pipeline
from affeq_rt.errors import AffeqError
from affeq_rt.registry.spec import Preprocessing

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402

torch = pytest.importorskip("torch")
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos

NVJPEG = gd.nvjpeg_status()
gpu = pytest.mark.gpu
needs_nvjpeg = pytest.mark.skipif(not NVJPEG[0], reason=f"nvjpeg unavailable: {NVJPEG[1]}")

BICUBIC = Preprocessing(224, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BILINEAR = Preprocessing(64, 0.875, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LARGE = Preprocessing(331, 0.911, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
KEYS = [BICUBIC, BILINEAR, LARGE]
#: (w, h): ImageNet's common sizes, a square, tall ones (Pillow ≥ 13 resizes those vertical pass
#: first: 3:1 and 4:1), a panorama, small images that are enlarged, and one whose short side is
#: already the resize target (no resize on that axis).
SIZES = [(500, 375), (375, 500), (333, 500), (400, 400), (300, 900), (250, 1000), (1600, 400),
         (90, 70), (40, 30), (256, 341)]


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A uint8 [h, w, 3] picture with smooth shading, noise and hard edges (what rounding
    differences show up on)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.sin(xx / 7.0) * 60 + np.cos(yy / 11.0) * 60 + 128 + rng.normal(0, 25, (h, w))
    arr = np.dstack([a, a[::-1, ::-1], (xx * 255 // max(w - 1, 1))]).clip(0, 255).astype(np.uint8)
    checker = (xx // 13 + yy // 17) % 2 == 0
    arr[checker] = 255 - arr[checker]
    return arr


def as_tensor(arr: np.ndarray, device: str = "cpu"):
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device)


def test_gpu_resize_is_pillows_to_the_bit_on_the_cpu() -> None:
    """Tolerance 0: both sides compute the same integers. Pillow sums pixel·tap with 22-bit
    integer taps in int32 and rounds (+2²¹, >> 22, clip) after each pass; crop_tensor computes
    the same taps (the same float64 operations) and the same sums in float64, where every product
    (< 2⁸·2²³) and partial sum (< 2⁴⁰) is an integer below 2⁵³, so exact in any order. Covers both
    orders of passes, enlargement, and an axis left as it is."""
    for w, h in SIZES:
        arr = picture(w, h, seed=w + h)
        for k in KEYS:
            want = crop(Image.fromarray(arr), k)
            got = gd.crop_tensor(as_tensor(arr), k).numpy()
            assert got.shape == (k.input_size, k.input_size, 3)
            np.testing.assert_array_equal(got, want, err_msg=f"{w}x{h} {k.interpolation} "
                                                             f"{k.input_size}")


def test_gpu_crop_box_and_torchvision_agreement() -> None:
    """The crop box is geometry()'s: a bright disc lands where exact puts it (crop_tensor and
    exact are equal to the bit, so its centroid too: < 1e-9 px). Against the ``torchvision``
    pipeline's crop of the same pixels: ≤ 2 levels, because that pipeline is within 2 levels of
    exact (int16 taps flip a first-pass rounding by one level, carried by vertical taps whose
    absolute sum is ≤ 1.14, plus the last rounding) and this one is exact."""
    from affeq_rt.data.preprocess import _torch_crop, _torchvision

    tv = _torchvision()
    if tv is None:
        pytest.skip("torchvision does not import")
    w, h = 500, 375
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (xx - 301.0) ** 2 + (yy - 151.0) ** 2 < 30.0 ** 2
    arr = np.dstack([np.where(disc, 230, 40).astype(np.uint8)] * 3)

    def centroid(a: np.ndarray) -> np.ndarray:
        m = np.clip(a[..., 0].astype(float) - 40.0, 0, None)
        ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]]
        return np.array([(xs * m).sum(), (ys * m).sum()]) / m.sum()

    for k in (BICUBIC, BILINEAR):
        got = gd.crop_tensor(as_tensor(arr), k).numpy()
        want = crop(Image.fromarray(arr), k)
        assert np.abs(centroid(got) - centroid(want)).max() < 1e-9
        pic = picture(w, h, seed=3)
        ours = gd.crop_tensor(as_tensor(pic), k).numpy().astype(int)
        theirs = _torch_crop(as_tensor(pic), (w, h), k, "x.jpg", tv[3]).astype(int)
        assert np.abs(ours - theirs).max() <= 2


def test_gpu_resize_refuses_what_exact_refuses() -> None:
    """A geometry error is exact's one-line AffeqError naming the file; a filter it has no exact
    taps for is a ValueError (the loader routes those geometries to the CPU before)."""
    with pytest.raises(AffeqError, match=r"dot.jpg is 3×3 pixels: .* enlarged"):
        gd.crop_tensor(as_tensor(picture(3, 3)), BICUBIC, "dot.jpg")
    with pytest.raises(ValueError, match="lanczos"):
        gd.crop_tensor(as_tensor(picture(50, 50)), Preprocessing(32, 1.0, "lanczos", (0,) * 3,
                                                                 (1,) * 3))


def test_gpu_route_takes_only_plain_complete_jpegs(tmp_path: Path) -> None:
    """Baseline RGB and grey JPEGs go to the GPU; a truncated JPEG (no end-of-image marker:
    nvJPEG might decode it half grey where Pillow refuses it), CMYK, PNG, a geometry exact
    refuses and a Lanczos key take the exact route."""
    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(picture(120, 90)).save(rgb, quality=90)
    grey = tmp_path / "grey.jpg"
    Image.fromarray(picture(120, 90)[..., 0]).save(grey, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(rgb.read_bytes()[: rgb.stat().st_size * 2 // 3])
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(picture(120, 90)).convert("CMYK").save(cmyk)
    png = tmp_path / "rgb.png"
    Image.fromarray(picture(120, 90)).save(png)
    dot = tmp_path / "dot.jpg"
    Image.fromarray(picture(3, 3)).save(dot)
    assert gd._gpu_route(str(rgb), KEYS) == rgb.read_bytes()
    assert gd._gpu_route(str(grey), KEYS) is not None
    for p in (cut, cmyk, png, dot, tmp_path / "missing.jpg"):
        assert gd._gpu_route(str(p), KEYS) is None, p.name
    lanczos = Preprocessing(64, 0.875, "lanczos", (0.5,) * 3, (0.5,) * 3)
    assert gd._gpu_route(str(rgb), [BICUBIC, lanczos]) is None


@pytest.fixture
def cpu_nvjpeg(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``nvjpeg`` pipeline with its decode on the CPU (torchvision's libjpeg-turbo):
    available, and every batch decoded by ``decode_crops`` on "cpu". Yields how many files
    each batch's GPU route decoded."""
    pytest.importorskip("torchvision")
    real = gd.decode_crops
    taken: list[int] = []

    def on_cpu(paths, keys, device="cuda"):  # noqa: ARG001 — the device the loader asked for
        out = real(paths, keys, "cpu")
        taken.append(len(out))
        return out

    monkeypatch.setattr(gd, "nvjpeg_status", lambda _device="cuda": (True, ""))
    monkeypatch.setattr(gd, "decode_crops", on_cpu)
    return taken


def test_nvjpeg_loader_equals_exact_with_a_libjpeg_decode(tmp_path: Path,
                                                         cpu_nvjpeg: list[int]) -> None:
    """With a decoder bit-identical to Pillow's, the pipeline is ``exact`` to the bit: the same
    rows, the same skipped samples with the same reasons (the corrupt and the truncated file
    mid-list), in-process whatever ``workers`` says; grey JPEGs went through the GPU route,
    CMYK/PNG/palette/RGBA files and the unreadable ones through exact's."""
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    import photos

    pytest.importorskip("skimage")
    from affeq_rt.data.readers import discover

    good = photos.write_photos(tmp_path, count=12, corrupt=True)
    src = discover(tmp_path)
    specs = [BILINEAR, Preprocessing(48, 1.0, "bicubic", (0.4,) * 3, (0.3,) * 3)]

    def rows(pipeline: str, workers: int) -> list:
        return [(b.start, b.stop, b.ok.tobytes(), b.skipped,
                 {k.input_size: v.tobytes() for k, v in b.tensors.items()})
                for b in iter_batches(src.samples, specs, batch_size=5, workers=workers,
                                      pipeline=pipeline)]

    want = rows("exact", 0)
    got = rows("nvjpeg", 2)
    assert got == want
    skipped = [s for b in want for s in b[3]]
    assert [Path(p).name for _, p, _ in skipped] == [photos.CORRUPT, photos.TRUNCATED]
    jpegs = [p for p in good if p.suffix == ".jpg" and "cmyk" not in p.name]
    assert sum(cpu_nvjpeg) == len(jpegs) > 0  # the GPU route did the plain JPEGs


def test_resolution_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fast`` is the CPU fast path on the CPU and wherever nvjpeg does not load; on a CUDA
    device where it loads it is ``nvjpeg``; ``nvjpeg`` asked where it does not load is one
    line naming the reason and the fix."""
    cpu_fast = resolve_pipeline("fast")
    assert cpu_fast in ("torchvision", "pillow")
    assert resolve_pipeline("fast", "cpu") == cpu_fast
    monkeypatch.setattr(gd, "nvjpeg_status", lambda _device="cuda": (False, "torch sees no GPU"))
    assert resolve_pipeline("fast", "cuda") == cpu_fast
    with pytest.raises(AffeqError) as e:
        resolve_pipeline("nvjpeg")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("the nvjpeg preprocessing pipeline does not load here: "
                                   "torch sees no GPU; use --preprocessing fast or exact")
    monkeypatch.setattr(gd, "nvjpeg_status", lambda _device="cuda": (True, ""))
    assert resolve_pipeline("fast", "cuda:0") == "nvjpeg"
    assert resolve_pipeline("fast", "cpu") == cpu_fast
    assert resolve_pipeline("nvjpeg") == "nvjpeg"
    assert resolve_pipeline("exact", "cuda") == "exact"  # the default never changes by device
    assert gd.device_of_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert gd.device_of_providers(["CPUExecutionProvider"]) == "cpu"


def test_fast_on_the_cpu_imports_no_torch() -> None:
    """Deciding ``fast`` for the CPU probes nothing (torch takes seconds to import)."""
    code = ("import sys; from affeq_rt.data.preprocess import resolve_pipeline; "
            "resolve_pipeline('fast'); resolve_pipeline('fast', 'cpu'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_nvjpeg_here_matches_what_the_machine_has() -> None:
    """Without a CUDA GPU, asking for nvjpeg is the one-line error; with one, it resolves."""
    if NVJPEG[0]:
        assert resolve_pipeline("nvjpeg", "cuda") == "nvjpeg"
        assert resolve_pipeline("fast", "cuda") == "nvjpeg"
    else:
        with pytest.raises(AffeqError, match="nvjpeg preprocessing pipeline does not load here"):
            resolve_pipeline("nvjpeg", "cuda")


# ---- on a CUDA GPU (scripts/gpu-check.sh) --------------------------------------------------------
@gpu
@needs_nvjpeg
def test_cuda_resize_equals_cpu_resize() -> None:
    """The same integers on any device (see the CPU test): tolerance 0."""
    for w, h in SIZES:
        arr = picture(w, h, seed=w * h)
        for k in KEYS:
            cpu = gd.crop_tensor(as_tensor(arr), k).numpy()
            dev = gd.crop_tensor(as_tensor(arr, "cuda"), k).cpu().numpy()
            np.testing.assert_array_equal(dev, cpu)


@gpu
@needs_nvjpeg
def test_cuda_nvjpeg_loader_skips_like_exact(tmp_path: Path) -> None:
    """On the GPU: the same readable/skipped samples and reasons as ``exact``, each crop close
    to exact's, and the same bytes when resumed. Only the decoder differs: nvJPEG's IDCT and
    chroma upsampling round differently from libjpeg-turbo's (±1–2 levels on most pixels of a
    quality-90 JPEG, more on sharp colour edges), which the resize averages: mean |Δ| ≤ 2
    levels per crop."""
    from affeq_rt.data.readers import discover

    for i, (w, h) in enumerate([(500, 375), (375, 500), (300, 900), (640, 480)]):
        Image.fromarray(picture(w, h, seed=i)).save(tmp_path / f"p{i}.jpg", quality=90)
    Image.fromarray(picture(200, 150)[..., 1]).save(tmp_path / "p5_grey.jpg", quality=90)
    Image.fromarray(picture(200, 150)).save(tmp_path / "p6.png")
    data = (tmp_path / "p0.jpg").read_bytes()
    (tmp_path / "p1_cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "p2_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    src = discover(tmp_path)
    ex = list(iter_batches(src.samples, KEYS, batch_size=3, workers=0, pipeline="exact"))
    nv = list(iter_batches(src.samples, KEYS, batch_size=3, pipeline="nvjpeg", device="cuda"))
    assert [(b.start, b.ok.tolist(), b.skipped) for b in nv] == \
        [(b.start, b.ok.tolist(), b.skipped) for b in ex]
    for a, b in zip(nv, ex, strict=True):
        for k in a.tensors:
            d = np.abs(a.tensors[k] - b.tensors[k]) * np.asarray(k.std)[None, :, None, None] * 255
            assert d.reshape(len(d), -1).mean(axis=1).max() <= 2.0
    assert prepare_crops(str(tmp_path / "p6.png"), KEYS[:1], "nvjpeg")[0].tobytes() == \
        crop(load_image(tmp_path / "p6.png"), KEYS[0]).tobytes()
    # resumed at the second batch: the same bytes (what keeps a store byte-identical on resume)
    again = list(iter_batches(src.samples, KEYS, batch_size=3, start=3, pipeline="nvjpeg",
                              device="cuda"))
    assert [{k: v.tobytes() for k, v in b.tensors.items()} for b in again] == \
        [{k: v.tobytes() for k, v in b.tensors.items()} for b in nv[1:]]



def test_extract_decodes_for_the_device_its_networks_run_on(env, tmp_path: Path,
                                                             cpu_nvjpeg: list[int],
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The hook from extraction to the loader: networks that run on CUDA make ``fast`` the
    ``nvjpeg`` pipeline (recorded in the store, and pinned in the options that a cluster worker
    receives), and the store's rows are ``exact``'s to the bit (the decode here is
    libjpeg-turbo's); networks on the CPU keep ``fast`` on the CPU."""
    from affeq_rt.io.store import FeatureStore
    from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
    from affeq_rt.method.rows import ImageSource

    opts = ImageOptions(workers=0, random_weights=True, export_root=env["exports"])
    models = photos.E2E_MODELS[:2]
    on_cpu = ImageSource(env["photos"], models, replace(opts, pipeline="fast"))
    assert (on_cpu.device, on_cpu.pipeline) == ("cpu", resolve_pipeline("fast"))
    ref = extract(models, env["photos"], tmp_path / "exact",
                  options=ExtractOptions(dtype="float32"), images=replace(opts, pipeline="exact"))
    assert not cpu_nvjpeg  # exact never takes the GPU route
    seen: list[ImageOptions] = []
    chunks = ImageSource.chunks

    def spy(self: ImageSource, *a: object, **k: object):  # the options the pass runs with
        seen.append(self.options)
        return chunks(self, *a, **k)

    monkeypatch.setattr(ImageSource, "device", property(lambda _self: "cuda"))  # CUDA sessions
    monkeypatch.setattr(ImageSource, "chunks", spy)
    got = extract(models, env["photos"], tmp_path / "fast",
                  options=ExtractOptions(dtype="float32"), images=replace(opts, pipeline="fast"))
    st, want = FeatureStore.open(got.path), FeatureStore.open(ref.path)
    assert st.manifest["pipeline"] == "nvjpeg"
    assert seen
    assert all(o.pipeline == "nvjpeg" for o in seen)  # pinned, not "fast"
    assert sum(cpu_nvjpeg) > 0  # the GPU route decoded the JPEGs
    for m in models:
        assert np.array_equal(np.asarray(st.features(m)), np.asarray(want.features(m)))
    assert st.manifest["skipped"] == want.manifest["skipped"]
