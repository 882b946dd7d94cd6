"""``affeq-rt export``: write a backbone's checked features.onnx + classifier.onnx export folder."""

from __future__ import annotations

from typing import Optional

import typer


def run(
    name: str = typer.Argument(..., help="Registry name or alias (see affeq-rt models)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w",  # noqa: UP045 (typer)
                                          help="State-dict file (.pth/.safetensors) to load."),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Random initial weights (tests, benchmarks)."),
    out: Optional[str] = typer.Option(None, "--out", "-o",  # noqa: UP045
                                      help="Export root; the folder is OUT/<name> "
                                           "(default $AFFEQ_RT_HOME/exports)."),
) -> None:
    """Export NAME as features.onnx (image → pooled features) and classifier.onnx (features →
    logits), plus head.safetensors and manifest.json, after checking ONNX against the framework."""
    from affeq_rt.cli import spinner
    from affeq_rt.onnx.export import ExportedBackbone, export_backbone

    steps = 6  # build, features, classifier, checker, compare, done
    with spinner() as bar:
        task = bar.add_task(f"exporting {name}", total=steps)

        def step(msg: str) -> None:
            bar.update(task, description=msg, advance=1)

        path = export_backbone(name, out, weights=weights, random_weights=random_weights,
                               progress=step)
    exp = ExportedBackbone(path)
    err = exp.manifest["export_error"]
    typer.echo(f"exported {exp.name} to {path}")
    typer.echo(f"features {exp.spec.feature_dim}-d, {exp.manifest['num_classes']} classes, "
               f"weights {exp.manifest['weights'].get('source')}")
    typer.echo(f"export error {err['max_rel']:.2e} (relative, tolerance {err['tolerance']:g}) on "
               f"{len(err['inputs'])} inputs")
