"""``affeq-rt export``: write a backbone's checked features.onnx + classifier.onnx export folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import ExportRoot, Offline, Quiet, RandomWeights
from affeq_rt.errors import AffeqError


def run(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="Registry name or alias (see affeq-rt models).")],
    weights: Annotated[Path | None, typer.Option(
        "--weights", "-w", metavar="FILE", show_default=False,
        help="State-dict file (.pth/.safetensors) to load.")] = None,
    random_weights: RandomWeights = False,
    export_root: ExportRoot = None,
    old_out: Annotated[Path | None, typer.Option(
        "--out", "-o", hidden=True, help="Deprecated spelling of --export-root.")] = None,
    quiet: Quiet = False,
    _offline: Offline = False,
) -> None:
    """Export NAME as features.onnx (image → pooled features) and classifier.onnx (features →
    logits), plus head.safetensors and manifest.json, into EXPORT_ROOT/NAME after checking ONNX
    against the framework. Hub weights are downloaded on first use into the Hugging Face / torch
    hub cache unless HF_HUB_OFFLINE=1 or --offline."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.onnx.export import export_backbone
    if old_out is not None:  # the old spelling, kept hidden and silent for scripts
        if export_root is not None:
            raise AffeqError("both --export-root and --out given",
                             "give --export-root only (--out is its old name)")
        export_root = old_out
    with Display(quiet) as display:
        exp = export_backbone(name, export_root, weights=weights, random_weights=random_weights,
                              progress=display)
    path = exp.path
    err = exp.manifest["export_error"]
    typer.echo(f"exported {exp.name} to {path}")
    typer.echo(f"features {exp.spec.feature_dim}-d, {exp.manifest['num_classes']} classes, "
               f"weights {exp.manifest['weights'].get('source')}")
    typer.echo(f"export error {err['max_rel']:.2e} (relative, tolerance {err['tolerance']:g}) on "
               f"{len(err['inputs'])} inputs")
