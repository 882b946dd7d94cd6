"""``affeq-rt info``: versions, compiled backends and onnxruntime providers on this machine."""

from __future__ import annotations

import json
from typing import Any

import typer

from affeq_rt.cli.options import Json
from affeq_rt.errors import AffeqError


def providers() -> list[dict[str, Any]]:
    """onnxruntime's providers: listed by the install, and whether a session really loads them.

    onnxruntime-gpu lists GPU providers whose libraries may be missing, so "loads" comes from
    :func:`affeq_rt.onnx.runtime.loadable_providers` (a one-node session), not from the list.
    Providers affeq-rt never asks for are shown as listed but not probed (``loads`` None).
    """
    from affeq_rt.onnx.runtime import PROVIDERS, loadable_providers
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise AffeqError(f"onnxruntime is not importable ({e})",
                         "pip install onnxruntime-gpu (Linux x86_64/aarch64) or onnxruntime"
                         ) from None
    listed = list(ort.get_available_providers())
    loads = set(loadable_providers())
    used = set(PROVIDERS.values())
    return [{"name": p, "listed": True, "loads": (p in loads) if p in used else None}
            for p in listed]


def run(as_json: Json = False) -> None:
    """Show affeq-rt's version and those of the packages that shape results, the compiled
    backends (cpu, cuda) and which onnxruntime providers are listed and really load."""
    from affeq_rt.core.backends import backends
    from affeq_rt.io.fsio import versions
    vers = versions()
    bks = [{"name": b.name, "available": b.available, "reason": b.reason} for b in backends()]
    provs = providers()
    if as_json:
        typer.echo(json.dumps({"versions": vers, "backends": bks, "providers": provs}, indent=2))
        return
    for k, v in vers.items():
        typer.echo(f"{k:18s} {v}")
    for b in bks:
        typer.echo(f"backend {b['name']:10s} {'yes' if b['available'] else 'no ':3s}  "
                   f"{b['reason']}")
    for p in provs:
        state = {True: "loads", False: "listed, does not load here", None: "listed, not used"}
        typer.echo(f"provider {p['name']:28s} {state[p['loads']]}")
