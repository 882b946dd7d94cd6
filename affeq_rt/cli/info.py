"""``affeq-rt info``: versions, compiled backends and onnxruntime providers on this machine."""

from __future__ import annotations

import typer


def run() -> None:
    """Show affeq-rt's version, compiled backends and which onnxruntime providers really load."""
    from affeq_rt.core.backends import backends
    from affeq_rt.io.fsio import versions

    for k, v in versions().items():
        typer.echo(f"{k:18s} {v}")
    for b in backends():
        typer.echo(f"backend {b.name:10s} {'yes' if b.available else 'no ':3s}  {b.reason}")
