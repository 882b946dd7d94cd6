"""Hybrid graph surgery: A's features graph + a folded linear head (+ optional uint8 preprocessing).

``compose_hybrid`` returns ONE ``ModelProto`` computing ``softmax(W x + b)`` on A's features, every
name of A's graph prefixed ``a/``; ``save_model`` writes it, with external data past 2 GiB.

Size honesty: protobuf cannot serialise a message of 2 GiB or more, so nothing here serialises a
whole model in memory once ``too_big_for_memory`` says so: parts are merged with
``onnx.compose.merge_graphs`` (``merge_models`` runs ``checker.check_model`` on the in-memory
proto, which serialises it), and big models are checked from their saved file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from affeq_rt._version import __version__
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.registry.spec import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    import onnx

INPUT_NAME = "image"
OUTPUTS = ("logits", "probabilities")
MIN_OPSET = 13  # Softmax(axis=1) on [N, K] means the same at every opset ≥ 13
TWO_GB = 2**31 - 1  # protobuf's limit for one serialised message (onnx's MAXIMUM_PROTOBUF)


def _onnx() -> Any:
    import onnx

    return onnx


def too_big_for_memory(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be serialised as one protobuf (its tensors must go external)."""
    return model.ByteSize() >= TWO_GB


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset; AffeqError if it imports none."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise AffeqError("the features model imports no default ONNX opset", "re-export the backbone")


def real_inputs(graph: Any) -> list[Any]:
    """The graph inputs that are not initializers."""
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def dims(vi: Any) -> list[int | str | None]:
    """Shape of a ValueInfo: ints, symbolic names, or None for unknown."""
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def check_features_model(model: onnx.ModelProto, d_src: int, input_size: int,
                         what: str = "features.onnx") -> str:
    """Check A's features graph: one float image input, one [N, d] output; return the batch name."""
    onnx = _onnx()
    g = model.graph
    ins, outs = real_inputs(g), list(g.output)
    if len(ins) != 1 or len(outs) != 1:
        raise AffeqError(f"{what} has {len(ins)} inputs and {len(outs)} outputs, expected 1 and 1",
                         "re-export the backbone with affeq-rt export")
    fl = onnx.TensorProto.FLOAT
    if ins[0].type.tensor_type.elem_type != fl or outs[0].type.tensor_type.elem_type != fl:
        raise AffeqError(f"{what} is not float32 in and out", "re-export the backbone")
    di, do = dims(ins[0]), dims(outs[0])
    if len(di) != 4 or len(do) != 2:
        raise AffeqError(f"{what} maps rank {len(di)} to rank {len(do)}, expected [N,3,S,S]→[N,d]",
                         "re-export the backbone")
    if not isinstance(di[0], str):
        raise AffeqError(f"{what} has a fixed batch size ({di[0]})",
                         "re-export it with a dynamic batch dimension")
    if isinstance(do[1], int) and do[1] != d_src:
        raise AffeqError(f"{what} gives {do[1]} features but the map expects {d_src}",
                         "use maps fitted on this backbone's features")
    if any(isinstance(s, int) and s != input_size for s in di[2:]) or di[1] not in (3, None):
        raise AffeqError(f"{what} takes {di[1:]} images, the registry says 3×{input_size}²",
                         "re-export the backbone")
    return di[0]


def _reconcile(model: onnx.ModelProto, min_opset: int) -> onnx.ModelProto:
    """Bring a part to an opset where our head ops mean what we want; keep its IR version."""
    v = default_opset(model)
    if v >= min_opset:
        return model
    if too_big_for_memory(model):  # the converter serialises the model in memory
        raise AffeqError(f"the features graph is over 2 GiB at opset {v}: too big to convert to "
                         f"opset {min_opset} in memory", f"re-export it with opset ≥ {min_opset}")
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, min_opset)
    except Exception as e:  # the converter raises bare RuntimeErrors with adapter names
        raise AffeqError(f"cannot convert the features graph from opset {v} to {min_opset} ({e})",
                         f"re-export the backbone with opset ≥ {min_opset}") from None
    converted.ir_version = max(converted.ir_version, model.ir_version)
    return converted


def head_model(w: np.ndarray, b: np.ndarray, batch: str, opset: int, ir_version: int,
               in_name: str) -> onnx.ModelProto:
    """``features [N,d] → Gemm(W, b) → logits [N,K] → Softmax → probabilities [N,K]``."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    k, d = w.shape
    fl = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Gemm", [in_name, "head/weight", "head/bias"], [OUTPUTS[0]],
                         name="head/gemm", transB=1),
        helper.make_node("Softmax", [OUTPUTS[0]], [OUTPUTS[1]], name="head/softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info(in_name, fl, [batch, d])],
        [helper.make_tensor_value_info(OUTPUTS[0], fl, [batch, k]),
         helper.make_tensor_value_info(OUTPUTS[1], fl, [batch, k])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w, np.float32), "head/weight"),
                     numpy_helper.from_array(np.ascontiguousarray(b, np.float32), "head/bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def preprocess_model(pre: Preprocessing, batch: str, opset: int, ir_version: int,
                     out_name: str) -> onnx.ModelProto:
    """uint8 NHWC ``image`` → float32 NCHW normalised like ``preprocess.normalize``."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    s = pre.input_size
    consts = {
        "pre/scale": np.asarray(1.0 / 255.0, np.float32),
        "pre/mean": np.asarray(pre.mean, np.float32).reshape(1, 1, 1, 3),
        "pre/std": np.asarray(pre.std, np.float32).reshape(1, 1, 1, 3),
    }
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pre/float"], name="pre/cast",
                         to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["pre/float", "pre/scale"], ["pre/scaled"], name="pre/scale"),
        helper.make_node("Sub", ["pre/scaled", "pre/mean"], ["pre/centred"], name="pre/sub"),
        helper.make_node("Div", ["pre/centred", "pre/std"], ["pre/nhwc"], name="pre/div"),
        helper.make_node("Transpose", ["pre/nhwc"], [out_name], name="pre/nchw", perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes, "preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.UINT8, [batch, s, s, 3])],
        [helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, [batch, 3, s, s])],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def merge(m1: onnx.ModelProto, m2: onnx.ModelProto,
          io_map: list[tuple[str, str]]) -> onnx.ModelProto:
    """Connect ``m1``'s outputs to ``m2``'s inputs after checking that no name is shared.

    ``onnx.compose.merge_graphs``, not ``merge_models``: the latter checks the merged proto in
    memory, which fails for models of 2 GiB or more. The merged model is checked where it is
    small enough (``compose_hybrid``) and, always, from its saved file (``save_model``).
    """
    onnx = _onnx()
    from onnx import compose, helper

    overlap = compose.check_overlapping_names(m1.graph, m2.graph, io_map)
    if overlap:
        raise InternalError(f"hybrid parts share names {overlap[:3]}")
    opsets: dict[str, int] = {}
    for op in [*m1.opset_import, *m2.opset_import]:
        opsets[op.domain] = max(opsets.get(op.domain, 0), int(op.version))
    graph = compose.merge_graphs(m1.graph, m2.graph, io_map)
    merged = helper.make_model(graph, producer_name="affeq-rt",
                               ir_version=max(m1.ir_version, m2.ir_version),
                               opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    clash = {f.name for f in m1.functions} & {f.name for f in m2.functions}
    if clash:
        raise InternalError(f"hybrid parts define the same local functions {sorted(clash)[:3]}")
    merged.functions.extend([*m1.functions, *m2.functions])
    if not isinstance(merged, onnx.ModelProto):  # pragma: no cover
        raise InternalError("merge_graphs returned no model")
    return merged


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for vi in g.input:
        if vi.name == old:
            vi.name = new
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def compose_hybrid(features: onnx.ModelProto, weight: np.ndarray, bias: np.ndarray,
                   pre: Preprocessing, with_preprocessing: bool = False,
                   min_opset: int = MIN_OPSET) -> onnx.ModelProto:
    """One graph: (optional uint8 preprocessing →) A's features (prefixed ``a/``) → folded head.

    ``weight`` [K, d_src] and ``bias`` [K] are the folded head (``maps.fold_head``); ``pre`` is
    A's preprocessing (input size; mean/std for the in-graph normalisation).
    """
    onnx = _onnx()
    from onnx import compose

    weight = np.asarray(weight)
    batch = check_features_model(features, weight.shape[1], pre.input_size)
    a = _reconcile(features, min_opset)
    in_old = real_inputs(a.graph)[0].name
    out_old = a.graph.output[0].name
    # Prefix every name of A's graph so nothing can collide with the head or the preprocessing.
    a = compose.add_prefix(a, "a/")
    opset = default_opset(a)
    head = head_model(weight, bias, batch, opset, a.ir_version, "head/features")
    model = merge(a, head, [(f"a/{out_old}", "head/features")])
    if with_preprocessing:
        pre_m = preprocess_model(pre, batch, opset, model.ir_version, "pre/image")
        model = merge(pre_m, model, [("pre/image", f"a/{in_old}")])
    else:
        _rename_input(model, f"a/{in_old}", INPUT_NAME)
    model.producer_name = "affeq-rt"
    model.producer_version = __version__
    del model.metadata_props[:]
    if not too_big_for_memory(model):  # past 2 GiB the check runs on the saved file
        onnx.checker.check_model(model)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, data_name: str | None) -> None:
    """Write ``model`` to ``path`` (its tensors in ``data_name`` beside it when given), then run
    the full checker on the file (which works at any size)."""
    onnx = _onnx()
    path = Path(path)
    if data_name is None:
        if too_big_for_memory(model):
            raise InternalError("a model of 2 GiB or more must be saved with external data")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # save_model moves the tensors out of the proto it is given
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
