"""Runtime: sessions report the provider that really loaded, forced providers fail loudly, batched
runs equal one-shot runs, and fp16 stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from affeq_rt.errors import AffeqError
from affeq_rt.onnx.export import check_inputs
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import PROVIDERS, create_session, loadable_providers


def test_auto_provider_is_one_that_loaded(lite0_export: Path) -> None:
    import onnxruntime as ort

    s = create_session(ExportedBackbone(lite0_export).classifier_path)
    assert s.provider == s.session.get_providers()[0]
    assert s.provider in loadable_providers()
    assert "CPUExecutionProvider" in loadable_providers()
    # never more than onnxruntime offers, and the CLI line names it
    assert set(loadable_providers()) <= set(ort.get_available_providers())
    assert s.provider_line == f"provider: {s.provider}"


@pytest.mark.parametrize("forced", ["cuda", "tensorrt"])
def test_forced_provider_must_load(lite0_export: Path, forced: str) -> None:
    path = ExportedBackbone(lite0_export).classifier_path
    if PROVIDERS[forced] in loadable_providers():
        assert create_session(path, provider=forced).provider == PROVIDERS[forced]
    else:
        with pytest.raises(AffeqError, match=f"provider {forced} does not load here"):
            create_session(path, provider=forced)


def test_bad_arguments(tmp_path: Path, lite0_export: Path) -> None:
    with pytest.raises(AffeqError, match="unknown provider 'gpu'"):
        create_session(ExportedBackbone(lite0_export).classifier_path, provider="gpu")
    with pytest.raises(AffeqError, match="does not exist"):
        create_session(tmp_path / "none.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(AffeqError, match="onnxruntime cannot load"):
        create_session(junk, provider="cpu")


def test_batched_run_equals_one_shot(lite0_export: Path) -> None:
    exp = ExportedBackbone(lite0_export)
    x = np.random.default_rng(0).standard_normal((7, 1280)).astype(np.float32)
    s = create_session(exp.classifier_path, provider="cpu")
    whole = s.run(x, batch_size=7)
    for bs in (1, 3, 100):
        # the same Gemm row by row; only blocking differs: float32 rounding, ~1e-6
        np.testing.assert_allclose(s.run(x, batch_size=bs), whole, rtol=1e-5, atol=1e-5)
    assert s.run(x[:0]).shape[0] == 0
    with pytest.raises(AffeqError, match="batch size 0"):
        s.run(x, batch_size=0)


def test_fp16_close_to_fp32_and_same_top1(lite0_export: Path) -> None:
    exp = ExportedBackbone(lite0_export)
    x, names = check_inputs(exp.spec, n_noise=0)
    f32 = create_session(exp.features_path, provider="cpu").run(x)
    s16 = create_session(exp.features_path, provider="cpu", fp16=True)
    assert s16.fp16
    assert s16.provider_line.endswith("(fp16)")
    f16 = s16.run(x)
    assert f16.dtype == np.float32  # inputs/outputs stay float32
    # float16 keeps 11 significant bits (~5e-4 per rounding); through ~60 layers the features
    # drift by up to ~1e-2 of their range
    assert np.abs(f16 - f32).max() <= 2e-2 * np.abs(f32).max()
    head = exp.head()
    w, b = head.weight, head.bias
    top32, top16 = (f32 @ w.T + b).argmax(1), (f16 @ w.T + b).argmax(1)
    assert (top32 == top16).all(), names


# ------------------------------------------------------------ hostile files (issue 23)

def _fixed_model(path: Path, location: str | None = None) -> Path:
    """A one-node ONNX (``y = x · W``) taking exactly [1, 4]; with ``location`` its weight is
    stored as external data at that (relative) location."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    if location is not None:
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=location)
        w.ClearField("raw_data")
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph([node], "fixed", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(m.SerializeToString())
    return path


def test_an_onnxruntime_refusal_at_run_time_is_one_error_line(tmp_path) -> None:
    """A model fed a shape its graph does not take (a hybrid whose metadata lies about its
    input): onnxruntime's InvalidArgument was a traceback (exit 70) in predict."""
    model = create_session(_fixed_model(tmp_path / "m.onnx"))
    assert model.run(np.ones((1, 4), np.float32)).shape == (1, 4)
    with pytest.raises(AffeqError, match=r"onnxruntime cannot run .*m.onnx on x \[1, 5\]") as e:
        model.run(np.ones((1, 5), np.float32))
    assert "\n" not in str(e.value)
    with pytest.raises(AffeqError, match="cannot run"):
        model.run_feeds({"x": np.ones((2, 4), np.float32)})


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused_before_any_read(
        tmp_path, location: str, fp16: bool) -> None:
    (tmp_path / "secret.bin").write_bytes(np.eye(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    path = _fixed_model(folder / "m.onnx", location)
    with pytest.raises(AffeqError, match="outside its folder"):
        create_session(path, fp16=fp16)


def test_fp16_on_a_truncated_or_hostile_file_is_one_error_line(tmp_path) -> None:
    """``--fp16`` converted the graph before onnxruntime saw it: a file that does not parse was
    refused through the bug path (exit 70)."""
    full = _fixed_model(tmp_path / "m.onnx").read_bytes()
    for name, data in (("cut.onnx", full[: len(full) // 2]), ("junk.onnx", b"\x08\x07junk")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AffeqError, match=f"{name} is not a readable ONNX model"):
            create_session(tmp_path / name, fp16=True)
    inside = _fixed_model(tmp_path / "ext.onnx", "ext.bin")
    (tmp_path / "ext.bin").write_bytes(np.eye(4, dtype=np.float32).tobytes())
    assert create_session(inside, fp16=True).run(np.ones((1, 4), np.float32)).shape == (1, 4)
