"""``affeq-rt predict``: classify image files with an exported backbone through onnxruntime."""

from __future__ import annotations

from typing import Optional

import typer


def run(
    name: str = typer.Argument(..., help="Registry name (exported on first use) or export folder."),
    images: list[str] = typer.Argument(..., help="Image files."),
    top: int = typer.Option(5, "--top", "-k", help="Classes to show per image."),
    provider: str = typer.Option("auto", "--provider",
                                 help="onnxruntime provider: auto|tensorrt|cuda|cpu."),
    fp16: bool = typer.Option(False, "--fp16", help="Run the graphs in float16."),
    export_root: Optional[str] = typer.Option(None, "--export-root",  # noqa: UP045 (typer)
                                              help="Export cache folder."),
) -> None:
    """Print the top ImageNet classes (index, probability, name) of each image and which
    onnxruntime provider ran, using the backbone's own preprocessing. NAME is a registry name
    (exported into the export root on first use) or an export folder."""
    from affeq_rt.cli import spinner
    from affeq_rt.onnx.export import predict_files

    with spinner() as bar:
        task = bar.add_task(f"preparing {name}", total=None)
        results, prov, exp = predict_files(
            name, images, top=top, provider=provider, root=export_root, fp16=fp16,
            progress=lambda msg: bar.update(task, description=msg))
    typer.echo(f"model: {exp.name} ({exp.path})")
    typer.echo(prov)
    for path, res in zip(images, results, strict=True):
        typer.echo(path)
        for i, (c, p, n) in enumerate(zip(res.indices, res.probs, res.names, strict=True), 1):
            typer.echo(f"  {i}. {c:4d}  {p:6.1%}  {n}")
