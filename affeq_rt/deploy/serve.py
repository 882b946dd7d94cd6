"""Serve hybrid ONNX models over the Open Inference Protocol v2 (Triton's protocol) with MLServer.

``serve(MODEL_OR_REPO, port=8000)`` starts MLServer (REST on ``port``, gRPC on ``port + 1``, both on
127.0.0.1 unless ``host`` says otherwise) with ``oip_runtime.OnnxRuntimeServing``, a small runtime
that runs each model through ``runtime.create_session``. ``MODEL_OR_REPO`` is one ``.onnx`` file or
a Triton model repository written by ``build-hybrid --server-repo`` (its configs are validated with
Triton's schema first). Clients: ``tritonclient.http.InferenceServerClient("127.0.0.1:8000")`` as
it comes: JSON tensors and the protocol's binary tensor extension (Triton's clients' default;
``oip_runtime.BinaryTensors``) both work.

What the server exposes: only the models named on the command line. MLServer's model repository
is ``oip_runtime.NoRepository`` (it holds nothing and reads no folder), so nothing can be planted
for it and nothing is written to disk that a ``kill -9`` could leave behind; the repository API's
load and unload are refused (403), readiness (``/v2/health/ready``) is true only while every
served model is loaded and ready; request bodies are capped (413) and malformed requests answered
400 in one line (``oip_runtime.LockedMLServer``). docs/RELIABILITY.md lists these promises and
their tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affeq_rt.deploy.metadata import default_model_name, read_metadata
from affeq_rt.deploy.triton import TRITON_TO_OIP, check_name, onnx_io, read_repository
from affeq_rt.errors import AffeqError
from affeq_rt.onnx.runtime import create_session

#: The first Python MLServer 1.7.1 (its latest release) does not install on: pyproject.toml's
#: serve extra leaves it out there (docs/ARCHITECTURE.md, "Serving base").
MLSERVER_PYTHONS = (3, 13)


@dataclass(frozen=True)
class ServedModel:
    """One model to serve: its name, version and ONNX file."""

    name: str
    version: str
    path: Path


def _metadata_tensors(path: Path) -> tuple[list[Any], list[Any]]:
    """Input/output metadata (batch dimension −1) for the model's metadata endpoint."""
    from mlserver.types import MetadataTensor

    ins, outs = onnx_io(path)

    def conv(ts: list[Any]) -> list[Any]:
        return [MetadataTensor(name=t.name, datatype=TRITON_TO_OIP[t.data_type],
                               shape=[-1, *t.dims]) for t in ts]

    return conv(ins), conv(outs)


def find_models(target: str | os.PathLike, name: str | None = None) -> list[ServedModel]:
    """What ``target`` serves: one ``.onnx`` file (named ``name``, its hybrid name or its stem),
    or every model of a Triton repository (configs validated with Triton's schema)."""
    p = Path(target)
    if p.is_file():
        if p.suffix != ".onnx":
            raise AffeqError(f"{p} is not an .onnx file", "pass a model file or a repository")
        if name is None:
            meta = read_metadata(p)["metadata"]
            name = (default_model_name(meta["source"], meta["target"], bool(meta.get("fp16")))
                    if "source" in meta and "target" in meta else p.stem)

        check_name(name)
        return [ServedModel(name, "1", p)]
    if p.is_dir():
        models = [ServedModel(m.name, m.version, m.path) for m in read_repository(p)]
        if name is not None:
            models = [m for m in models if m.name == name]
            if not models:
                raise AffeqError(f"repository {p} has no model {name!r}", "check --name")
        return models
    raise AffeqError(f"{p} does not exist", "pass a hybrid .onnx file or a model repository")


def check_port(host: str, port: int, what: str = "--port") -> None:
    """AffeqError if something already listens on ``host:port`` (or it cannot be bound)."""
    if not 0 < port < 65536:
        raise AffeqError(f"port {port} is out of range", f"pass {what} between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn/grpc bind
        try:
            s.bind((host, port))
        except OSError as e:
            raise AffeqError(f"port {port} on {host} is in use ({e.strerror})",
                             f"stop what uses it or pass {what} with a free port") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and ``--port 0``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def settings_for(models: list[ServedModel], host: str, port: int, grpc_port: int,
                 provider: str) -> tuple[Any, list[Any]]:
    """MLServer ``Settings`` (no metrics server, no worker pool, no access log, no response
    compression, a model repository that holds nothing: ``oip_runtime.NoRepository``) and one
    ``ModelSettings`` each, whose ``uri`` is the served file itself (a >2 GiB hybrid's ``.data``
    file is found beside it)."""
    from mlserver.settings import ModelParameters, ModelSettings, Settings

    from affeq_rt.deploy.oip_runtime import NoRepository, OnnxRuntimeServing

    # debug=False: no access-log line per request (and no debug tracebacks from FastAPI);
    # gzip_enabled=False: responses are not compressed (a CPU cost per answer; requests that are
    # compressed are refused anyway, oip_runtime.BodyLimit)
    settings = Settings(host=host, http_port=port, grpc_port=grpc_port, metrics_endpoint=None,
                        parallel_workers=0, load_models_at_startup=False,
                        model_repository_implementation=NoRepository, debug=False,
                        gzip_enabled=False)
    ms = []
    for m in models:
        ins, outs = _metadata_tensors(m.path)
        ms.append(ModelSettings(
            name=m.name, implementation=OnnxRuntimeServing, platform="onnxruntime_onnx",
            versions=[m.version], inputs=ins, outputs=outs,
            parameters=ModelParameters(uri=str(m.path.resolve()), version=m.version,
                                       extra={"provider": provider}),
        ))
    return settings, ms


def serve(target: str | os.PathLike, port: int = 8000, host: str = "127.0.0.1",
          grpc_port: int | None = None, provider: str = "auto", name: str | None = None,
          announce: Any = print) -> None:
    """Serve ``target`` until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    if importlib.util.find_spec("mlserver") is None:
        if sys.version_info >= MLSERVER_PYTHONS:  # the serve extra skips it there
            raise AffeqError(f"affeq-rt serve runs on MLServer, which does not support Python "
                             f"{sys.version_info.major}.{sys.version_info.minor} (3.10-3.12 "
                             "only; MLServer issue #2288)",
                             "run serve under Python 3.10-3.12, or serve the "
                             "build-hybrid --server-repo repository with Triton")
        raise AffeqError("MLServer is not installed", "pip install 'affeq-rt[serve]'")
    models = find_models(target, name)
    if port == 0:
        port = free_port(host)
    grpc_port = port + 1 if grpc_port is None else grpc_port
    if grpc_port == port:
        raise AffeqError(f"--grpc-port {grpc_port} is the same as --port: REST and gRPC need a "
                         "port each", "pass another --grpc-port (default: --port + 1)")
    check_port(host, port, "--port")
    check_port(host, grpc_port, "--grpc-port")
    for m in models:  # a model that cannot load is an error here, not a log line in the server
        create_session(m.path, provider=provider)
    settings, model_settings = settings_for(models, host, port, grpc_port, provider)
    for m in models:
        announce(f"serving {m.name} (v{m.version}, {m.path}) at "
                 f"http://{host}:{port}/v2/models/{m.name}  (gRPC {host}:{grpc_port})")

    async def main() -> None:
        from affeq_rt.deploy.oip_runtime import LockedMLServer

        server = LockedMLServer(settings, [m.name for m in models])
        await server.start(model_settings)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
