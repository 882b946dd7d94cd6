"""Triton Inference Server model repositories for hybrid ONNX models: layout, config, validation.

A repository holds ``<repo>/<model>/config.pbtxt``, ``<repo>/<model>/labels.txt`` and
``<repo>/<model>/1/model.onnx``. The config uses the onnxruntime backend
(``platform: "onnxruntime_onnx"``), dynamic batching, and optionally the TensorRT execution
accelerator (fp16, engine cache). Every generated config is parsed with Triton's own
``ModelConfig`` protobuf (shipped in ``tritonclient``) and checked against the ONNX graph.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import (
    atomic_dir,
    atomic_path,
    ensure_writable_dir,
    write_bytes_atomic,
)

PLATFORM = "onnxruntime_onnx"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
# The one table of tensor element types, as each side names them: ONNX TensorProto, onnxruntime,
# the Open Inference Protocol, Triton's config, numpy. The lookups below are views of it.
TENSOR_TYPES: tuple[tuple[str, str, str, str, type], ...] = (
    ("FLOAT", "tensor(float)", "FP32", "TYPE_FP32", np.float32),
    ("FLOAT16", "tensor(float16)", "FP16", "TYPE_FP16", np.float16),
    ("DOUBLE", "tensor(double)", "FP64", "TYPE_FP64", np.float64),
    ("UINT8", "tensor(uint8)", "UINT8", "TYPE_UINT8", np.uint8),
    ("INT8", "tensor(int8)", "INT8", "TYPE_INT8", np.int8),
    ("INT32", "tensor(int32)", "INT32", "TYPE_INT32", np.int32),
    ("INT64", "tensor(int64)", "INT64", "TYPE_INT64", np.int64),
    ("BOOL", "tensor(bool)", "BOOL", "TYPE_BOOL", np.bool_),
)
ONNX_TO_TRITON = {onnx: triton for onnx, _, _, triton, _ in TENSOR_TYPES}
TRITON_TO_OIP = {triton: oip for _, _, oip, triton, _ in TENSOR_TYPES}
ORT_TO_OIP = {ort: oip for _, ort, oip, _, _ in TENSOR_TYPES}
OIP_TO_NUMPY = {oip: dtype for _, _, oip, _, dtype in TENSOR_TYPES}


@lru_cache(maxsize=1)
def model_config_pb2() -> Any:
    """Triton's ``model_config_pb2`` from the installed tritonclient.

    It lives in ``tritonclient/grpc/``, whose ``__init__`` needs grpcio; the generated module
    itself needs only protobuf, so it is loaded from its file.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise AffeqError("tritonclient is not installed (Triton's model-config schema ships in it)",
                         "pip install 'affeq-rt[serve]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise AffeqError(f"tritonclient at {path.parent.parent} lacks grpc/model_config_pb2.py",
                         "pip install --upgrade 'tritonclient[http]>=2.40'")
    mspec = importlib.util.spec_from_file_location("affeq_rt._triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(mspec)
    assert mspec.loader is not None
    mspec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton sees it (``dims`` without the batch dimension)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def onnx_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file as Triton tensors; the first dimension must be the
    dynamic batch, every other one fixed."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # OSError, or onnx's DecodeError on a file that is not ONNX
        raise AffeqError(f"{path} is not a readable ONNX model ({e.__class__.__name__})",
                         "rebuild it with affeq-rt build-hybrid (a copy was cut short or "
                         "replaced)") from None
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    inits = {t.name for t in model.graph.initializer}

    def conv(vi: Any, kind: str) -> TensorSpec:
        tt = vi.type.tensor_type
        dims = list(tt.shape.dim)
        if not dims or dims[0].HasField("dim_value"):
            raise AffeqError(f"{kind} {vi.name} of {path} has no dynamic batch dimension",
                             "rebuild the model with affeq-rt build-hybrid")
        rest = []
        for d in dims[1:]:
            if not d.HasField("dim_value"):
                raise AffeqError(f"{kind} {vi.name} of {path} has a dynamic non-batch dimension",
                                 "rebuild the model with affeq-rt build-hybrid")
            rest.append(int(d.dim_value))
        t = ONNX_TO_TRITON.get(names.get(tt.elem_type, ""))
        if t is None:
            raise AffeqError(f"{kind} {vi.name} of {path} has an unsupported type",
                             "use float32, float16 or uint8 tensors")
        return TensorSpec(vi.name, t, tuple(rest))

    ins = [conv(i, "input") for i in model.graph.input if i.name not in inits]
    outs = [conv(o, "output") for o in model.graph.output]
    return ins, outs


def _tensor_block(t: TensorSpec, labels: bool) -> str:
    lab = f'\n    label_filename: "{LABELS_FILE}"' if labels else ""
    return (f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n'
            f'    dims: [ {", ".join(str(d) for d in t.dims)} ]{lab}\n  }}')


@dataclass(frozen=True)
class Serving:
    """How Triton serves a model: batching, and the TensorRT accelerator (FP16 when ``fp16``)
    with its engine cache at ``engine_cache`` (default ``/tmp/triton-trt-cache/<name>``)."""

    max_batch_size: int = 32
    tensorrt: bool = False
    fp16: bool = False
    engine_cache: str | None = None
    queue_delay_us: int = 500


def make_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                serving: Serving = Serving(), labels: bool = True) -> str:
    """``config.pbtxt`` text for an ONNX model served by Triton's onnxruntime backend, as
    ``serving`` says; ``labels`` attaches ``labels.txt`` to every output with one value per
    class."""
    max_batch_size, tensorrt = serving.max_batch_size, serving.tensorrt
    if max_batch_size < 1:
        raise AffeqError(f"max batch size {max_batch_size} < 1", "pass --max-batch-size 1 or more")
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch_size] or [max_batch_size]
    lines = [
        f'name: "{name}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t, False) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t, labels and len(t.dims) == 1)
                                  for t in outputs) + "\n]",
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
        f"  max_queue_delay_microseconds: {serving.queue_delay_us}\n}}",
        'version_policy: { latest: { num_versions: 1 } }',
    ]
    if tensorrt:
        cache = serving.engine_cache or f"/tmp/triton-trt-cache/{name}"
        params = {"precision_mode": "FP16" if serving.fp16 else "FP32",
                  "max_workspace_size_bytes": str(1 << 30),
                  "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache}
        plist = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}'
                          for k, v in params.items())
        lines.append("optimization {\n  execution_accelerators {\n"
                     "    gpu_execution_accelerator: [\n      {\n"
                     f'        name: "tensorrt"\n{plist}\n      }}\n    ]\n  }}\n}}')
    return "\n".join(lines) + "\n"


def parse_config(text: str, source: str = CONFIG_FILE) -> Any:
    """Parse config.pbtxt text into Triton's ``inference.ModelConfig``; AffeqError if invalid."""
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise AffeqError(f"{source} does not match Triton's model-config schema ({e})",
                         "fix or regenerate it with affeq-rt build-hybrid --server-repo") from None
    return cfg


def validate_config(text: str, onnx_path: str | os.PathLike | None = None,
                    model_dir: str | os.PathLike | None = None, source: str = CONFIG_FILE) -> Any:
    """Parse ``text`` with Triton's schema, then check it against the model it serves.

    Checks: onnxruntime platform, batching, every tensor named/typed/shaped like the ONNX graph
    (dims without the batch dimension), label files present, TensorRT parameters well formed.
    """
    pb2 = model_config_pb2()
    cfg = parse_config(text, source)
    bad = []
    if cfg.platform != PLATFORM and cfg.backend != "onnxruntime":
        bad.append(f"platform {cfg.platform!r} is not {PLATFORM!r}")
    if cfg.max_batch_size < 1:
        bad.append("max_batch_size must be ≥ 1 for a dynamic-batch model")
    if cfg.HasField("dynamic_batching"):
        over = [b for b in cfg.dynamic_batching.preferred_batch_size if b > cfg.max_batch_size]
        if over:
            bad.append(f"preferred_batch_size {over} exceeds max_batch_size")
    dt = pb2.DataType
    for t in list(cfg.input) + list(cfg.output):
        if not t.name or t.data_type == dt.TYPE_INVALID or not list(t.dims):
            bad.append(f"tensor {t.name!r} lacks a name, a data type or dims")
    for acc in cfg.optimization.execution_accelerators.gpu_execution_accelerator:
        if acc.name == "tensorrt":
            pm = acc.parameters.get("precision_mode", "FP32")
            if pm not in ("FP32", "FP16"):
                bad.append(f"tensorrt precision_mode {pm!r} not FP32/FP16")
    if onnx_path is not None:
        ins, outs = onnx_io(onnx_path)
        for kind, want, got in (("input", ins, cfg.input), ("output", outs, cfg.output)):
            have = {t.name: t for t in got}
            if set(have) != {t.name for t in want}:
                bad.append(f"{kind}s {sorted(have)} differ from the model's "
                           f"{sorted(t.name for t in want)}")
                continue
            for t in want:
                c = have[t.name]
                if dt.Name(c.data_type) != t.data_type or tuple(c.dims) != t.dims:
                    bad.append(f"{kind} {t.name}: config says {dt.Name(c.data_type)} "
                               f"{list(c.dims)}, the model {t.data_type} {list(t.dims)}")
    if model_dir is not None:
        for t in cfg.output:
            if t.label_filename and not (Path(model_dir) / t.label_filename).is_file():
                bad.append(f"label file {t.label_filename} is missing")
    if bad:
        raise AffeqError(f"{source} is not a valid Triton config: {'; '.join(bad)}",
                         "regenerate it with affeq-rt build-hybrid --server-repo")
    return cfg


def check_name(name: str) -> None:
    """AffeqError unless ``name`` is a safe model folder name."""
    if not name or not all(c.isalnum() or c in "_-." for c in name) or name.startswith("."):
        raise AffeqError(f"model name {name!r} is not a safe folder name",
                         "use letters, digits, '_', '-' and '.'")


def check_repo_target(repo: str | os.PathLike, name: str, force: bool) -> Path:
    """Where ``name`` would go in ``repo``; AffeqError if it exists and ``force`` is off."""
    check_name(name)
    target = Path(repo) / name
    if target.exists() and not force:
        raise AffeqError(f"model folder {target} already exists", "pass --force to replace it")
    return target


def write_model_repository(repo: str | os.PathLike, name: str, onnx_path: str | os.PathLike,
                           labels: list[str] | None = None, force: bool = False,
                           serving: Serving = Serving(), version: int = 1) -> Path:
    """Write ``<repo>/<name>/{config.pbtxt, labels.txt, <version>/model.onnx}`` served as
    ``serving`` says; return the folder.

    The folder is assembled beside its final place and renamed in (``fsio.atomic_dir``: files get
    the umask mode, a full disk is one error line, a killed run's temporary folder is removed by
    the next write into ``repo``), so a failure leaves nothing half-written; an existing folder is
    replaced only with ``force``.
    """
    target = check_repo_target(repo, name, force)
    ensure_writable_dir(repo)
    src = Path(onnx_path)
    ins, outs = onnx_io(src)
    k = {t.dims[0] for t in outs if len(t.dims) == 1}
    has_labels = bool(labels) and len(k) == 1 and len(labels) == next(iter(k))
    text = make_config(name, ins, outs, serving, has_labels)
    data = src.parent / f"{src.name}.data"
    need = src.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    with atomic_dir(target, need=need) as tmp:
        vdir = tmp / str(version)
        vdir.mkdir()
        with atomic_path(vdir / MODEL_FILE) as t:
            shutil.copyfile(src, t)
        if data.is_file():  # external data of a > 2 GB model keeps its file name
            with atomic_path(vdir / data.name) as t:
                shutil.copyfile(data, t)
        if has_labels:
            write_bytes_atomic(tmp / LABELS_FILE, ("\n".join(labels) + "\n").encode())
        write_bytes_atomic(tmp / CONFIG_FILE, text.encode())
        validate_config(text, vdir / MODEL_FILE, tmp, source=str(target / CONFIG_FILE))
    return target


@dataclass(frozen=True)
class RepoModel:
    """One servable model found in a repository."""

    name: str
    version: str
    path: Path
    config: Any


def read_repository(repo: str | os.PathLike) -> list[RepoModel]:
    """Every model of a Triton repository (latest numeric version), configs validated."""
    root = Path(repo)
    if not root.is_dir():
        raise AffeqError(f"model repository {root} is not a folder", "check the path")
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = d / CONFIG_FILE
        if not cfg_path.is_file():
            continue
        versions = sorted((v for v in d.iterdir() if v.is_dir() and v.name.isdigit()),
                          key=lambda v: int(v.name))
        if not versions:
            raise AffeqError(f"{d} has no numeric version folder", "add e.g. 1/model.onnx")
        model = versions[-1] / MODEL_FILE
        if not model.is_file():
            raise AffeqError(f"{model} is missing", "rebuild with affeq-rt build-hybrid")
        try:
            text = cfg_path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise AffeqError(f"{cfg_path} cannot be read ({e.__class__.__name__})",
                             "regenerate it with affeq-rt build-hybrid --server-repo") from None
        cfg = validate_config(text, model, d, source=str(cfg_path))
        if cfg.name and cfg.name != d.name:
            raise AffeqError(f"{cfg_path} names the model {cfg.name!r}, its folder is {d.name!r}",
                             "make them agree")
        found.append(RepoModel(d.name, versions[-1].name, model, cfg))
    if not found:
        raise AffeqError(f"{root} holds no model folder with a config.pbtxt",
                         "write one with affeq-rt build-hybrid --server-repo")
    return found
