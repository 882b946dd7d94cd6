"""The one place that creates onnxruntime sessions: TensorRT → CUDA → CPU, what really loads.

onnxruntime-gpu lists GPU providers even where their libraries cannot load, so the provider
that runs is read from ``session.get_providers()`` after creation, never from
``get_available_providers()``.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise AffeqError(f"onnxruntime is not importable ({e})",
                         "pip install onnxruntime-gpu (Linux x86_64/aarch64) or onnxruntime"
                         ) from None
    return ort


def _provider_options(key: str) -> dict[str, Any]:
    if key == "tensorrt":
        home = Path(os.environ.get("AFFEQ_RT_HOME", Path.home() / ".cache" / "affeq-rt"))
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(home / "trt-cache")}
    return {}


def half_model(model: Any) -> Any:
    """An fp16 copy of an ONNX ``ModelProto``: weights and activations float16, inputs and
    outputs unchanged, nodes re-sorted (the converter appends its input/output Casts at the end).

    Uses onnxconverter-common when installed, else the same converter shipped inside
    onnxruntime (``onnxruntime.transformers.float16``).
    """
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError:
            raise AffeqError("fp16 needs a float16 converter: neither onnxconverter-common nor "
                             "onnxruntime.transformers.float16 is importable",
                             "pip install onnxconverter-common, or run without --fp16") from None
    half = convert_float_to_float16(model, keep_io_types=True)
    _toposort(half.graph)
    return half


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    nodes = list(graph.node)
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    import heapq

    pending = [len(ds) for ds in deps]
    ready = [i for i, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise AffeqError("the fp16 graph has a cycle", "run without --fp16 and report this")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else e.__class__.__name__


def external_data_files(model: Any, path: str | os.PathLike) -> list[Path]:
    """The external data files a loaded (``load_external_data=False``) model's tensors name,
    each checked to lie in the model's own folder: AffeqError for a location that is absolute,
    climbs out with ``..`` or resolves (through links) outside it — before anything reads it."""
    folder = Path(path).resolve().parent
    out: list[Path] = []
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for t in tensors:
        for e in t.external_data:
            if e.key != "location":
                continue
            loc = e.value
            target = (folder / loc).resolve()
            if (not loc or os.path.isabs(loc) or ".." in Path(loc).parts
                    or target.parent != folder and folder not in target.parents):
                raise AffeqError(f"{path} names external data {loc!r} outside its folder",
                                 "use a model whose weights are inline or in a file beside it")
            if target not in out:
                out.append(target)
    return out


def to_fp16(model_path: str | os.PathLike) -> bytes:
    """:func:`half_model` of an ONNX file, serialised. A file that does not parse, names
    external data outside its folder, or that the converter cannot handle is an AffeqError."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    p = Path(model_path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / google.protobuf errors
        raise AffeqError(f"{p} is not a readable ONNX model ({e.__class__.__name__})",
                         "re-export it (a truncated or modified file)") from None
    if external_data_files(model, p):
        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as e:
            raise AffeqError(f"{p}'s external data cannot be read ({_first_line(e)})",
                             "re-export it") from None
    try:
        return half_model(model).SerializeToString()
    except AffeqError:
        raise
    except Exception as e:  # the converter on a graph it cannot convert (the file's fault)
        raise AffeqError(f"{p} cannot be converted to float16 ({e.__class__.__name__}: "
                         f"{_first_line(e)})", "run without --fp16") from None


class OrtModel:
    """An onnxruntime session with the provider that really runs and batched numpy inference."""

    def __init__(self, session: Any, path: Path, requested: str, fp16: bool,
                 notes: list[str]) -> None:
        self.session = session
        self.path = path
        self.requested = requested
        self.fp16 = fp16
        self.notes = notes  # why higher-priority providers did not load
        self.providers: list[str] = list(session.get_providers())
        self.provider: str = self.providers[0]
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_types = [i.type for i in session.get_inputs()]  # e.g. "tensor(float)"
        self.output_names = [o.name for o in session.get_outputs()]

    def __repr__(self) -> str:
        return f"OrtModel({self.path.name}, provider={self.provider}, fp16={self.fp16})"

    @property
    def provider_line(self) -> str:
        """The line the CLI prints: ``provider: CPUExecutionProvider``."""
        return f"provider: {self.provider}" + (" (fp16)" if self.fp16 else "")

    def run(self, x: np.ndarray, batch_size: int = 32, output: int | str = 0) -> np.ndarray:
        """Run the single-input model on ``x`` in batches; one output (index or name), numpy."""
        if len(self.input_names) != 1:
            raise AffeqError(f"{self.path.name} has {len(self.input_names)} inputs",
                             "use run_feeds with a dict of inputs")
        dtype = np.uint8 if self.input_types[0] == "tensor(uint8)" else np.float32
        x = np.ascontiguousarray(x, dtype=dtype)
        idx = self.output_names.index(output) if isinstance(output, str) else int(output)
        if batch_size <= 0:
            raise AffeqError(f"batch size {batch_size} is not positive", "pass a batch size >= 1")
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        name, feed = self.output_names[idx], self.input_names[0]
        outs = [self._run([name], {feed: x[i:i + batch_size]})[0]
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0)

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on named inputs; returns every output."""
        return self._run(None, feeds)

    def _run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run``; onnxruntime's refusal of this model on these inputs (a shape or type
        the graph does not take, a node that fails) is one AffeqError line naming the file."""
        try:
            return self.session.run(names, feeds)
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
            raise AffeqError(f"onnxruntime cannot run {self.path} on {shapes} "
                             f"({_first_line(e)})", "check that the model and its input match "
                             "(a hybrid whose metadata does not describe its graph: rebuild "
                             "it)") from None


def _make_session(ort: Any, model: str | bytes, keys: list[str],
                  threads: int | None, spinning: bool = True) -> tuple[Any, str]:
    """Create a session quietly: (session, what onnxruntime printed about failed providers)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [(PROVIDERS[k], _provider_options(k)) for k in keys]
    buf = io.StringIO()
    ort.set_default_logger_severity(4)  # provider-library load failures are expected on CPU hosts
    try:
        with contextlib.redirect_stdout(buf):  # onnxruntime prints its EP fallback notice
            sess = ort.InferenceSession(model, sess_options=so, providers=providers)
    finally:
        ort.set_default_logger_severity(2)
    return sess, buf.getvalue()


def create_session(path: str | os.PathLike, provider: str = "auto", fp16: bool = False,
                   threads: int | None = None, spinning: bool = True) -> OrtModel:
    """Open an ONNX model with the best provider that loads here (``auto``) or a forced one.

    ``provider``: ``auto`` (TensorRT → CUDA → CPU), ``tensorrt``, ``cuda`` or ``cpu``; a
    forced provider that does not load raises AffeqError. ``fp16`` converts the graph's
    weights and compute to float16 (inputs and outputs stay float32). ``spinning=False``:
    onnxruntime's intra-op threads sleep between parallel sections instead of spin-waiting
    (a server's choice: its event loop and the clients need the cores those spins take).
    """
    ort = _ort()
    p = Path(path)
    if not p.is_file():
        raise AffeqError(f"ONNX model {p} does not exist", "export it first (affeq-rt export NAME)")
    provider = provider.lower()
    if provider not in ("auto", *PROVIDERS):
        raise AffeqError(f"unknown provider {provider!r}", "use auto, tensorrt, cuda or cpu")
    if not fp16:  # (to_fp16 checks this itself) nothing is read outside the model's folder
        _check_external(p)
    model: str | bytes = to_fp16(p) if fp16 else str(p)
    if provider == "auto":
        keys = list(AUTO_ORDER)
    else:
        keys = [provider] if provider == "cpu" else [provider, "cpu"]
    try:
        sess, printed = _make_session(ort, model, keys, threads, spinning)
    except Exception as e:
        if provider not in ("auto", "cpu"):  # a forced GPU provider that fails hard
            first = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
            raise AffeqError(f"provider {provider} does not load here ({first})",
                             "use --provider auto or cpu") from None
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
        raise AffeqError(f"onnxruntime cannot load {p} ({msg})", "re-export the model") from None
    got = sess.get_providers()
    if provider != "auto" and got[0] != PROVIDERS[provider]:
        raise AffeqError(f"provider {provider} does not load here (session runs on {got[0]})",
                         "use --provider auto or cpu")
    notes = [line.strip() for line in printed.splitlines() if line.strip().startswith("EP Error")]
    return OrtModel(sess, p, provider, fp16, notes)


def _check_external(p: Path) -> None:
    """:func:`external_data_files` of the file at ``p``. Every external-data reference holds the
    key ``location``, so a file without those bytes (most: weights inline) is not parsed here; a
    file that does not parse is left to onnxruntime's own one-line refusal."""
    import mmap

    with open(p, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(b"location") < 0:
                return
    import onnx

    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable: onnxruntime refuses it in one line
        return
    external_data_files(model, p)


def loadable_providers() -> list[str]:
    """Providers that really load here, probed with a one-node model (cached per process)."""
    global _LOADABLE
    if _LOADABLE is None:
        import tempfile

        import onnx
        from onnx import TensorProto, helper

        node = helper.make_node("Identity", ["x"], ["y"])
        vx = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        vy = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([node], "probe", [vx], [vy])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "probe.onnx"
            onnx.save(m, str(f))
            _LOADABLE = create_session(f).providers
    return list(_LOADABLE)


_LOADABLE: list[str] | None = None
