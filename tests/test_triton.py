"""Triton model repositories: layout, config.pbtxt checked with Triton's own ModelConfig schema."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")
pytest.importorskip("tritonclient")

from affeq_rt.deploy.triton import (  # noqa: E402
    Serving,
    make_config,
    model_config_pb2,
    onnx_io,
    parse_config,
    read_repository,
    validate_config,
    write_model_repository,
)
from affeq_rt.errors import AffeqError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    from test_hybrid import TinyParts

    folder = tmp_path_factory.mktemp("tri")
    return TinyParts(folder).build(folder / "tiny.onnx")


def test_config_parses_with_triton_schema(hybrid: Path) -> None:
    ins, outs = onnx_io(hybrid)
    text = make_config("tiny", ins, outs, Serving(max_batch_size=16, tensorrt=True, fp16=True))
    cfg = validate_config(text, hybrid)
    pb2 = model_config_pb2()
    assert isinstance(cfg, pb2.ModelConfig)
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 16
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [
        ("image", "TYPE_FP32", [3, 32, 32])]
    assert [t.name for t in cfg.output] == ["logits", "probabilities"]
    assert all(list(t.dims) == [7] and t.label_filename == "labels.txt" for t in cfg.output)
    assert max(cfg.dynamic_batching.preferred_batch_size) <= 16
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_enable"] == "1"
    assert trt.parameters["trt_engine_cache_path"].endswith("/tiny")


def test_schema_rejects_bad_configs(hybrid: Path) -> None:
    ins, outs = onnx_io(hybrid)
    good = make_config("tiny", ins, outs)
    with pytest.raises(AffeqError, match="schema"):
        parse_config(good.replace("max_batch_size", "max_batchsize"))  # unknown field
    with pytest.raises(AffeqError, match="schema"):
        parse_config(good.replace("TYPE_FP32", "TYPE_FLOAT32"))  # not a Triton data type
    with pytest.raises(AffeqError, match="config says TYPE_FP32 \\[3, 32, 31\\]"):
        validate_config(good.replace("dims: [ 3, 32, 32 ]", "dims: [ 3, 32, 31 ]"), hybrid)
    with pytest.raises(AffeqError, match="differ from the model"):
        validate_config(good.replace('name: "logits"', 'name: "scores"'), hybrid)
    with pytest.raises(AffeqError, match="exceeds max_batch_size"):
        validate_config(good.replace("max_batch_size: 32", "max_batch_size: 8"), hybrid)


def test_repository_layout_and_force(hybrid: Path, tmp_path: Path) -> None:
    labels = [f"class {i}" for i in range(7)]
    repo = tmp_path / "repo"
    folder = write_model_repository(repo, "tiny", hybrid, labels=labels)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "tiny", "tiny/1", "tiny/1/model.onnx", "tiny/config.pbtxt", "tiny/labels.txt"]
    assert (folder / "1" / "model.onnx").read_bytes() == hybrid.read_bytes()
    assert (folder / "labels.txt").read_text().splitlines() == labels
    umask = os.umask(0)
    os.umask(umask)
    for p in (folder / "1" / "model.onnx", folder / "config.pbtxt", hybrid):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a server's own user
    (m,) = read_repository(repo)
    assert (m.name, m.version, m.path) == ("tiny", "1", folder / "1" / "model.onnx")
    before = (folder / "config.pbtxt").read_text()
    with pytest.raises(AffeqError, match="already exists.*--force"):
        write_model_repository(repo, "tiny", hybrid, labels=labels, serving=Serving(4))
    assert (folder / "config.pbtxt").read_text() == before
    write_model_repository(repo, "tiny", hybrid, labels=labels, serving=Serving(4),
                           force=True)
    assert "max_batch_size: 4" in (folder / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no temp or backup folders left


def test_model_without_dynamic_batch_leaves_nothing(tmp_path: Path) -> None:
    from onnx import helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "fixed.onnx"
    path.write_bytes(helper.make_model(g).SerializeToString())
    repo = tmp_path / "repo"
    with pytest.raises(AffeqError, match="no dynamic batch dimension"):
        write_model_repository(repo, "fixed", path)
    assert not (repo / "fixed").exists()
    assert not repo.exists() or list(repo.iterdir()) == []


def test_bad_repository_inputs(hybrid: Path, tmp_path: Path) -> None:
    with pytest.raises(AffeqError, match="not a safe folder name"):
        write_model_repository(tmp_path / "r", "../escape", hybrid)
    with pytest.raises(AffeqError, match="holds no model folder"):
        read_repository(tmp_path)
    folder = write_model_repository(tmp_path / "r", "tiny", hybrid,
                                    labels=[str(i) for i in range(7)])
    (folder / "labels.txt").unlink()
    with pytest.raises(AffeqError, match="label file labels.txt is missing"):
        read_repository(tmp_path / "r")


def test_build_writes_repository(tmp_path: Path) -> None:
    from test_hybrid import TinyParts

    parts = TinyParts(tmp_path / "parts")
    out = parts.build(tmp_path / "h.onnx", server_repo=tmp_path / "repo", model_name="tiny_hyb",
                      tensorrt=True, fp16=False, max_batch_size=8)
    (m,) = read_repository(tmp_path / "repo")
    assert m.name == "tiny_hyb"
    assert m.path.read_bytes() == out.read_bytes()
    trt = m.config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.parameters["precision_mode"] == "FP32"
    labels = (tmp_path / "repo" / "tiny_hyb" / "labels.txt").read_text().splitlines()
    assert labels == [str(i) for i in range(7)]
    # an existing repository folder is refused before anything is built or written
    with pytest.raises(AffeqError, match="already exists"):
        parts.build(tmp_path / "h2.onnx", server_repo=tmp_path / "repo", model_name="tiny_hyb")
    assert not (tmp_path / "h2.onnx").exists()
    x = np.zeros((1, 3, 32, 32), np.float32)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], {"image": x})[0].shape == (1, 7)
