"""A hybrid's metadata (``metadata_props`` keys ``affeq_rt.*``): writing, reading, label names.

This is the hybrid's file edge: specs and preprocessing are stored as JSON here and read back
into :class:`~affeq_rt.registry.spec.Preprocessing` by :func:`hybrid_preprocessing`.

Integrity (issue 10): :func:`stamp_checksum` records ``affeq_rt.checksum`` — the SHA-256 of the
serialised graph (every node and weight; the metadata is outside it) and the size and SHA-256 of
an external data file. :func:`read_metadata` always checks that the file parses and the data file
has its size; with ``verify`` (or ``$AFFEQ_RT_VERIFY=1``) it recomputes the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from affeq_rt.data.labels import imagenet_names
from affeq_rt.deploy.compose import INPUT_NAME, default_opset, dims, real_inputs
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import jsonable, sha256_file, verify_requested
from affeq_rt.onnx.runtime import external_data_files
from affeq_rt.registry.spec import BackboneSpec, Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    import onnx

META_PREFIX = "affeq_rt."
CHECKSUM_KEY = "checksum"
REBUILD = "rebuild it with affeq-rt build-hybrid (the file is corrupt or was modified)"


def default_model_name(src: str, dst: str, fp16: bool = False) -> str:
    """Triton-safe model name ``<src>_to_<dst>[_fp16]``."""
    name = f"{src}_to_{dst}" + ("_fp16" if fp16 else "")
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def label_names(num_classes: int, label_offset: int) -> list[str]:
    """Class names for B's logits: ImageNet-1k descriptions (timm's table), ``background`` first
    for TF-slim 1001-class heads; plain indices for other heads."""
    n_imagenet = num_classes - label_offset
    names = list(imagenet_names()) if n_imagenet == 1000 else [str(i) for i in range(n_imagenet)]
    return ["background"] * label_offset + names


def preprocessing_record(a_spec: BackboneSpec, in_graph: bool) -> dict[str, Any]:
    """The ``preprocessing`` metadata entry: A's preprocessing and the input layout."""
    return {
        "in_graph": in_graph, "input": INPUT_NAME,
        "layout": "NHWC" if in_graph else "NCHW",
        "dtype": "uint8" if in_graph else "float32",
        **a_spec.preprocessing.to_dict(),
        "note": ("the graph does /255, -mean, /std and NHWC->NCHW; the caller resizes the short "
                 "side to floor(S/crop_pct) and centre-crops SxS (RGB)") if in_graph
                else f"the caller applies affeq_rt.data.preprocess.preprocess with {a_spec.name}'s"
                     " spec",
    }


def hybrid_preprocessing(meta: Mapping[str, Any], path: str | os.PathLike) -> \
        tuple[Preprocessing, bool]:
    """(A's preprocessing, whether the graph normalises uint8 NHWC itself) from read metadata."""
    rec = meta.get("preprocessing")
    if not isinstance(rec, Mapping):
        raise AffeqError(f"{path} records no preprocessing (not a hybrid, or an older one)",
                         "rebuild it with affeq-rt build-hybrid")
    pre = Preprocessing.from_dict(rec, source=f"{path} preprocessing metadata", fix=REBUILD)
    return pre, bool(rec.get("in_graph", False))


def check_input_record(meta: Mapping[str, Any], inputs: list[dict[str, Any]],
                       path: str | os.PathLike) -> None:
    """AffeqError if the ``preprocessing`` record lies about the graph's input: its name, layout
    (NCHW float or NHWC uint8) and size must be the graph's (``inputs`` as read_metadata lists
    them). Nothing to check without a record."""
    rec = meta.get("preprocessing")
    if not isinstance(rec, Mapping) or "input_size" not in rec:
        return
    try:
        s = int(rec["input_size"])
    except (TypeError, ValueError):
        raise AffeqError(f"{path} preprocessing metadata: input_size {rec['input_size']!r} is "
                         "not a number", REBUILD) from None
    in_graph = bool(rec.get("in_graph", False))
    name = rec.get("input", INPUT_NAME)
    want = (["N", s, s, 3], "UINT8") if in_graph else (["N", 3, s, s], None)
    got = next((i for i in inputs if i["name"] == name), None)
    if got is None or got["shape"][1:] != want[0][1:] or (want[1] and got["type"] != want[1]):
        graph = ", ".join(f"{i['name']} {i['type']} {i['shape']}" for i in inputs)
        raise AffeqError(f"{path} preprocessing metadata says input {name!r} is "
                         f"{want[1] or 'float'} {want[0]}, the graph takes {graph}", REBUILD)


def set_metadata(model: onnx.ModelProto, info: Mapping[str, Any]) -> None:
    """Replace ``affeq_rt.*`` metadata_props; non-string values are stored as JSON."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    for k, v in info.items():
        value = v if isinstance(v, str) else json.dumps(v, default=jsonable)
        model.metadata_props.add(key=META_PREFIX + k, value=value)


def graph_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialised graph: nodes, initializers (or their external-data references),
    inputs and outputs — everything but the model-level metadata that records it."""
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def _data_file(model: onnx.ModelProto, path: Path) -> Path | None:
    """The one external data file a hybrid's tensors point to (None: weights inline);
    AffeqError when any points outside the hybrid's folder, or more than one file is named."""
    files = external_data_files(model, path)
    if len(files) > 1:
        raise AffeqError(f"hybrid {path} names {len(files)} external data files", REBUILD)
    return path.parent / files[0].name if files else None


def stamp_checksum(path: str | os.PathLike) -> dict[str, Any]:
    """Record ``affeq_rt.checksum`` in the ONNX file at ``path`` (rewritten in place; call it on
    the temporary file before it is renamed in). Returns the record."""
    import onnx

    p = Path(path)
    model = onnx.load(str(p), load_external_data=False)
    data = _data_file(model, p)
    rec = {"algorithm": "sha256", "graph": graph_sha256(model),
           "data_file": data.name if data is not None else None,
           "data_bytes": data.stat().st_size if data is not None else None,
           "data_sha256": sha256_file(data) if data is not None else None}
    set_metadata(model, {**_decoded(model), CHECKSUM_KEY: rec})
    with open(p, "wb") as f:
        f.write(model.SerializeToString())
    return rec


def _decoded(model: onnx.ModelProto) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(META_PREFIX):
            continue
        try:
            meta[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
        except json.JSONDecodeError:
            meta[prop.key[len(META_PREFIX):]] = prop.value
    return meta


def check_integrity(model: onnx.ModelProto, meta: Mapping[str, Any], path: Path,
                    full: bool) -> str:
    """Compare a loaded hybrid with its ``checksum`` record: the external data file's presence
    and size always, the hashes when ``full``. Returns ``"verified"``, ``"size checked"`` or
    ``"no checksum recorded"``; AffeqError naming the file otherwise."""
    data = _data_file(model, path)  # the graph's own reference, checked to stay in the folder
    rec = meta.get(CHECKSUM_KEY)
    if rec is None:
        return "no checksum recorded"
    _check_record(rec, data, path)
    if data is not None:
        if not data.is_file():
            raise AffeqError(f"hybrid {path} lacks its external data file {data}", REBUILD)
        if data.stat().st_size != rec["data_bytes"]:
            raise AffeqError(f"hybrid data file {data} has {data.stat().st_size} bytes, the "
                             f"model records {rec.get('data_bytes')}", REBUILD)
    if not full:
        return "size checked"
    if graph_sha256(model) != rec.get("graph"):
        raise AffeqError(f"hybrid {path} fails its checksum", REBUILD)
    if data is not None and sha256_file(data) != rec.get("data_sha256"):
        raise AffeqError(f"hybrid data file {data} fails its checksum", REBUILD)
    return "verified"


def _check_record(rec: Any, data: Path | None, path: Path) -> None:
    """The checksum record is well formed and names the data file the graph uses (nothing
    else: a record naming ``/etc/passwd`` must not get that file hashed and called verified)."""
    ok = (isinstance(rec, Mapping) and rec.get("algorithm") == "sha256"
          and isinstance(rec.get("graph"), str))
    if ok and data is None:
        ok = not rec.get("data_file")
    elif ok:
        nbytes = rec.get("data_bytes")
        ok = (rec.get("data_file") == data.name and isinstance(rec.get("data_sha256"), str)
              and isinstance(nbytes, int) and not isinstance(nbytes, bool))
    if not ok:
        raise AffeqError(f"hybrid {path} has a checksum record that does not describe its own "
                         "files", REBUILD)


def read_metadata(path: str | os.PathLike, verify: bool | None = None) -> dict[str, Any]:
    """The ``affeq_rt.*`` metadata of a hybrid (JSON values decoded) plus its inputs and outputs.

    Integrity: the file must parse and its external data must have the recorded size; with
    ``verify`` (default ``$AFFEQ_RT_VERIFY``) the recorded SHA-256 hashes are recomputed too.
    ``integrity`` in the result says which check ran."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise AffeqError(f"model {p} does not exist", "check the path")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / google.protobuf errors
        raise AffeqError(f"{p} is not a readable ONNX model ({e.__class__.__name__})",
                         "pass a .onnx file written by affeq-rt build-hybrid (a hybrid that was "
                         "one is corrupt: rebuild it)") from None
    meta = _decoded(model)
    integrity = check_integrity(model, meta, p, verify_requested(verify))
    g = model.graph
    onnx_types = {v: k for k, v in onnx.TensorProto.DataType.items()}
    io = {
        "inputs": [{"name": i.name, "type": onnx_types.get(i.type.tensor_type.elem_type, "?"),
                    "shape": dims(i)} for i in real_inputs(g)],
        "outputs": [{"name": o.name, "type": onnx_types.get(o.type.tensor_type.elem_type, "?"),
                     "shape": dims(o)} for o in g.output],
        "opset": default_opset(model), "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    check_input_record(meta, io["inputs"], p)
    return {"path": str(p), "metadata": meta, "graph": io, "integrity": integrity}
