"""Spatial feature maps from an export's ``features.onnx``: the map before global average pooling
(for CAM) and one intermediate output per stage (for layer views), by graph surgery, no torch.

``spatial.onnx`` is ``features.onnx`` with one more graph output: ``spatial`` [N, C, h, w], the
input of the global average pool whose (flattened) output IS ``features`` [N, C]. Both outputs
come from one run of the same graph, so ``features == mean_{h,w}(spatial)`` up to float32
rounding, checked on every build. A network whose features are not a global average pool of a
4-D map (VGG/AlexNet: fc7 activations; LeNet-5; MobileNetV3: a conv after the pool) has no such
map: AffeqError, saying why.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import atomic_path, sha256_file
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import OrtModel, create_session

SPATIAL_FILE = "spatial.onnx"
SPATIAL_OUTPUT = "spatial"
META_SOURCE = "affeq_rt.features_sha256"
# Ops between the pool and the features output that only reshape (or are identities in eval).
_PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}
# |mean_hw(spatial) - features| <= SPATIAL_RTOL * max|spatial|: the same float32 tensor averaged
# by ORT (h*w <= 100 terms here: worst-case error (h*w) * 2^-24 * max|f| < 6e-6 * max|f|) and by
# NumPy in float64 (exact to 1e-16); 1e-5 leaves room for a pooling kernel's summation order.
SPATIAL_RTOL = 1e-5


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        raise AffeqError("onnx is not installed", "pip install onnx") from None
    return onnx


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _reduce_axes(node: Any, graph: Any) -> list[int] | None:
    """Axes of a ReduceMean (attribute up to opset 17, constant input from 18); None if unknown."""
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    if len(node.input) > 1 and node.input[1]:
        from onnx import numpy_helper

        for init in graph.initializer:
            if init.name == node.input[1]:
                return [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
        for n in graph.node:
            if n.op_type == "Constant" and node.input[1] in n.output:
                return [int(v) for v in numpy_helper.to_array(n.attribute[0].t).reshape(-1)]
    return None


def find_spatial_tensor(model: Any, name: str = "network") -> str:
    """Name of the [N, C, h, w] tensor whose global average pool is the features output.

    Walks back from the graph's single output through reshape-only ops to a GlobalAveragePool or
    a ReduceMean over the two spatial axes; anything else (a Relu/Gemm: fully connected features)
    means the network has no spatial map before its classifier: AffeqError.
    """
    graph = model.graph
    prod = _producers(graph)
    tensor = graph.output[0].name
    seen = []
    while True:
        node = prod.get(tensor)
        if node is None:
            raise AffeqError(f"{name} has no spatial feature map: its features are a graph input",
                             "CAM needs a CNN whose classifier follows global average pooling")
        seen.append(node.op_type)
        if node.op_type in _PASS_THROUGH:
            tensor = node.input[0]
            continue
        if node.op_type == "GlobalAveragePool":
            return node.input[0]
        if node.op_type == "ReduceMean":
            axes = _reduce_axes(node, graph)
            if axes is not None and sorted(a % 4 for a in axes) == [2, 3]:
                return node.input[0]
        raise AffeqError(
            f"{name} has no spatial feature map before its classifier: its features come from a "
            f"{node.op_type} ({' <- '.join(seen)}), not from global average pooling",
            "CAM needs a network whose classifier follows global average pooling (EfficientNet, "
            "MobileNetV2, ResNet, Inception, GoogLeNet, NASNet/PNASNet); VGG, AlexNet and "
            "LeNet-5 have fully connected heads")


def with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of ``model`` with the tensors ``names`` appended as float outputs (shape inferred
    where ONNX shape inference knows it)."""
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        infos = {v.name: v for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - shapes are optional for outputs
        infos = {}
    have = {o.name for o in m.graph.output}
    for n in names:
        if n in have:
            continue
        if n in infos:
            m.graph.output.append(infos[n])
        else:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                                     None))
    return m


@dataclass
class SpatialModel:
    """An opened ``spatial.onnx``: ``run(x)`` → (spatial [N,C,h,w], features [N,C]) float32."""

    path: Path
    session: OrtModel

    def run(self, x: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Spatial map and pooled features of preprocessed images ``x`` [N, 3, S, S]."""
        x = np.ascontiguousarray(x, np.float32)
        sp, ft = [], []
        names = self.session.output_names
        i_sp, i_ft = names.index(SPATIAL_OUTPUT), names.index("features")
        for i in range(0, len(x), batch_size):
            outs = self.session.run_feeds({self.session.input_names[0]: x[i:i + batch_size]})
            sp.append(np.asarray(outs[i_sp], np.float32))
            ft.append(np.asarray(outs[i_ft], np.float32).reshape(len(outs[i_ft]), -1))
        return np.concatenate(sp), np.concatenate(ft)


def check_spatial(sp: np.ndarray, feats: np.ndarray, name: str) -> float:
    """Raise InternalError unless ``mean_hw(sp) == feats`` within :data:`SPATIAL_RTOL`; returns
    the relative error."""
    if sp.ndim != 4 or sp.shape[:2] != feats.shape:
        raise InternalError(f"{name}: spatial map {sp.shape} does not pool to features "
                            f"{feats.shape}")
    scale = max(float(np.abs(sp).max()), 1e-30)
    err = float(np.abs(sp.astype(np.float64).mean(axis=(2, 3)) - feats).max()) / scale
    if err > SPATIAL_RTOL:
        raise InternalError(f"{name}: mean of the spatial map differs from the features by "
                            f"{err:.2e} of their scale (> {SPATIAL_RTOL:g})")
    return err


def _build(exp: ExportedBackbone, out: Path, digest: str) -> None:
    onnx = _onnx()
    model = onnx.load(str(exp.features_path))
    tensor = find_spatial_tensor(model, exp.name)
    m = with_outputs(model, [])
    # rename the pooled map's tensor to the stable output name ``spatial`` via an Identity
    m.graph.node.append(onnx.helper.make_node("Identity", [tensor], [SPATIAL_OUTPUT],
                                              name="affeq_rt/spatial"))
    m.graph.output.append(onnx.helper.make_tensor_value_info(SPATIAL_OUTPUT,
                                                             onnx.TensorProto.FLOAT, None))
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, {META_SOURCE: digest})
    with atomic_path(out) as tmp:
        onnx.save(m, str(tmp))


def spatial_path(exp: ExportedBackbone) -> Path:
    """Where the export's ``spatial.onnx`` lives: inside the export folder (an additive file; it
    is rebuilt whenever ``features.onnx`` changes), or a temp folder if that is read-only."""
    if os.access(exp.path, os.W_OK):
        return exp.path / SPATIAL_FILE
    return Path(tempfile.gettempdir()) / f"affeq_rt-{exp.name}-{SPATIAL_FILE}"


def open_spatial(exp: ExportedBackbone | str | os.PathLike, provider: str = "auto",
                 check: np.ndarray | None = None) -> SpatialModel:
    """Build (or reuse) and open the export's ``spatial.onnx``; AffeqError for a network without
    a spatial map. ``check``: preprocessed images on which ``mean_hw(spatial) == features`` is
    verified (default: two fixed noise images)."""
    exp = exp if isinstance(exp, ExportedBackbone) else ExportedBackbone(exp)
    digest = sha256_file(exp.features_path)
    out = spatial_path(exp)
    fresh = False
    if out.is_file():
        onnx = _onnx()
        props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False)
                 .metadata_props}
        fresh = props.get(META_SOURCE) == digest
    if not fresh:
        _build(exp, out, digest)
    model = SpatialModel(out, create_session(out, provider=provider))
    if check is None:
        s = exp.spec.input_size
        check = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
    sp, ft = model.run(check)
    check_spatial(sp, ft, exp.name)
    return model


_FLOAT_OPS = {"Conv", "Relu", "Clip", "BatchNormalization", "MaxPool", "AveragePool", "Sigmoid",
              "HardSigmoid", "HardSwish", "Mul", "Add", "Concat", "LeakyRelu", "Elu", "Tanh"}


def float_tensors(model: Any) -> list[str]:
    """Node outputs that are float tensors, in execution order: those ONNX type inference calls
    float, and outputs of float-only ops it could not type (timm's dynamic "same" padding hides
    conv shapes). Shapes are read at run time: see :func:`default_stages`."""
    onnx = _onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - typing is a hint here; run-time shapes decide
        types = {}
    out = []
    for n in model.graph.node:
        if n.op_type == "Pad":  # padded copies (timm's "same" padding) are not feature maps
            continue
        for o in n.output:
            t = types.get(o)
            if t == onnx.TensorProto.FLOAT or (t is None and n.op_type in _FLOAT_OPS
                                               and n.op_type not in ("Mul", "Add", "Concat")):
                out.append(o)
    return out


def default_stages(shapes: list[tuple[str, tuple[int, ...]]]) -> list[str]:
    """One tensor per stage from run-time ``(name, shape [C, h, w])`` pairs in execution order:
    the LAST tensor computed at each spatial resolution above 1×1 (a stage's output, just before
    the next downsampling), in order of decreasing resolution."""
    last: dict[tuple[int, int], str] = {}
    for name, shape in shapes:
        if len(shape) == 3 and shape[1] * shape[2] > 1:
            last[(shape[1], shape[2])] = name
    return [last[k] for k in sorted(last, key=lambda hw: -hw[0] * hw[1])]


def open_with_outputs(features_path: str | os.PathLike, names: list[str], folder: Path,
                      provider: str = "auto") -> OrtModel:
    """``features.onnx`` with ``names`` as extra outputs, saved into ``folder`` and opened."""
    onnx = _onnx()
    m = with_outputs(onnx.load(str(features_path)), names)
    path = folder / "layers.onnx"
    onnx.save(m, str(path))
    return create_session(path, provider=provider)
