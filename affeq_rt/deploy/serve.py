"""Serve hybrid ONNX models over the Open Inference Protocol v2 (Triton's protocol) with KServe.

``serve(MODEL_OR_REPO, port=8000)`` starts KServe's model server parts (REST on ``port``, gRPC on
``port + 1``, both on 127.0.0.1 unless ``host`` says otherwise) around ``oip_runtime.OnnxModel``,
a ``kserve.Model`` that runs each model through ``runtime.create_session``. ``MODEL_OR_REPO`` is
one ``.onnx`` file or a Triton model repository written by ``build-hybrid --server-repo`` (its
configs are validated with Triton's schema first). Clients:
``tritonclient.http.InferenceServerClient("127.0.0.1:8000")`` as it comes: JSON tensors and the
protocol's binary tensor extension (Triton's clients' default) both work, and
``tritonclient.grpc`` on the gRPC port.

What the server exposes: only the models named on the command line. Its model repository holds
those and reads no folder, so nothing can be planted for it and nothing is written to disk that a
``kill -9`` could leave behind; the repository API's load and unload are refused (403),
readiness (``/v2/health/ready``) is true only while every served model is loaded and ready;
request bodies are capped (413) and malformed requests answered 400 in one line
(``oip_runtime``). docs/RELIABILITY.md lists these promises and their tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affeq_rt.deploy.metadata import default_model_name, read_metadata
from affeq_rt.deploy.triton import check_name, read_repository
from affeq_rt.errors import AffeqError


@dataclass(frozen=True)
class ServedModel:
    """One model to serve: its name, version and ONNX file."""

    name: str
    version: str
    path: Path


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


def serve(target: str | os.PathLike, port: int = 8000, host: str = "127.0.0.1",
          grpc_port: int | None = None, provider: str = "auto", name: str | None = None,
          announce: Any = print) -> None:
    """Serve ``target`` until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    if importlib.util.find_spec("kserve") is None:
        raise AffeqError("KServe's model server (the kserve package) is not installed",
                         "pip install 'affeq-rt[serve]'")
    models = find_models(target, name)
    if port == 0:
        port = free_port(host)
    grpc_port = port + 1 if grpc_port is None else grpc_port
    if grpc_port == port:
        raise AffeqError(f"--grpc-port {grpc_port} is the same as --port: REST and gRPC need a "
                         "port each", "pass another --grpc-port (default: --port + 1)")
    check_port(host, port, "--port")
    check_port(host, grpc_port, "--grpc-port")
    from affeq_rt.deploy.oip_runtime import build, configure_logging, run, run_servers

    configure_logging()  # KServe's and uvicorn's loggers, to stderr
    # every model loads here: one that cannot is an error line, not a log line in the server
    plane, repository = build([(m.name, m.version, str(m.path.resolve())) for m in models],
                              provider)
    for m in models:
        announce(f"serving {m.name} (v{m.version}, {m.path}) at "
                 f"http://{host}:{port}/v2/models/{m.name}  (gRPC {host}:{grpc_port})")
    with contextlib.suppress(KeyboardInterrupt):
        run(run_servers(plane, repository, host, port, grpc_port))
