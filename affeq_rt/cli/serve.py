"""``affeq-rt serve``: serve a hybrid model (or a Triton repository) over OIP v2 with MLServer."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    target: Path = typer.Argument(..., help="A hybrid .onnx file or a Triton model repository."),
    port: int = typer.Option(8000, "--port", help="HTTP port (0 picks a free one)."),
    grpc_port: int | None = typer.Option(None, "--grpc-port", help="gRPC port (default "
                                         "port + 1)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    name: str | None = typer.Option(None, "--name", help="Model name (default: from the "
                                    "hybrid's metadata) or which repository model to serve."),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime provider: auto, cpu, "
                                 "cuda, tensorrt."),
) -> None:
    """Serve a hybrid or a Triton repository over OIP v2 (MLServer) on 127.0.0.1.

    REST and gRPC speak the protocol Triton speaks; query with tritonclient.http using
    binary_data=False. Ctrl-C stops.
    """
    from affeq_rt.deploy.serve import serve

    serve(target, port=port, host=host, grpc_port=grpc_port, provider=provider, name=name,
          announce=typer.echo)
