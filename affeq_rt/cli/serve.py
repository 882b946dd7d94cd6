"""``affeq-rt serve``: serve a hybrid model (or a Triton repository) over OIP v2 with KServe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import Provider


def run(
    target: Annotated[Path, typer.Argument(
        metavar="MODEL_OR_REPO",
        help="A hybrid .onnx file or a Triton model repository.")],
    port: Annotated[int, typer.Option("--port", help="HTTP port (0 picks a free one).")] = 8000,
    grpc_port: Annotated[int | None, typer.Option(
        "--grpc-port", show_default=False, help="gRPC port (default port + 1).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(
        "--name", show_default=False, help="Model name (default: from the hybrid's metadata) "
        "or which repository model to serve.")] = None,
    provider: Provider = "auto",
) -> None:
    """Serve a hybrid or a Triton repository over OIP v2 (KServe) on 127.0.0.1.

    REST and gRPC speak the protocol Triton speaks; query with tritonclient.http (JSON or binary
    tensors). Only the named models are served: repository load/unload are refused. Ctrl-C
    stops.
    """
    from affeq_rt.deploy.serve import serve
    serve(target, port=port, host=host, grpc_port=grpc_port, provider=provider, name=name,
          announce=typer.echo)
