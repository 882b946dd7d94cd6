"""``affeq-rt predict``: classify image files with an export, a registry name or a hybrid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import ExportRoot, Fp16, Offline, Provider, Quiet, Verify
from affeq_rt.errors import AffeqError
from affeq_rt.io.terminal import printable


def run(
    name: Annotated[str, typer.Argument(
        metavar="MODEL", help="Registry name (exported on first use), export folder, or hybrid "
        ".onnx file (affeq-rt build-hybrid).")],
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Image files.")],
    top: Annotated[int, typer.Option("--top", "-k", help="Classes to show per image.")] = 5,
    provider: Provider = "auto",
    fp16: Fp16 = False,
    export_root: ExportRoot = None,
    _offline: Offline = False,
    verify: Verify = False,
    quiet: Quiet = False,
) -> None:
    """Print the top ImageNet classes (index, probability, name) of each image and which
    onnxruntime provider ran. MODEL is a registry name (exported into the export root on first
    use), an export folder (both use the backbone's own preprocessing) or a hybrid .onnx file
    (uses the preprocessing recorded in its metadata)."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.deploy.metadata import read_metadata
    from affeq_rt.deploy.predict import predict
    if verify and Path(name).is_file():  # a hybrid: its recorded hashes (exports: always)
        read_metadata(name, verify=True)
    if top < 1:
        raise AffeqError(f"--top {top} is not a number of classes", "pass --top 1 or more")
    with Display(quiet) as display:
        pred = predict(name, images, top=top, provider=provider, export_root=export_root,
                       fp16=fp16, progress=display)
    typer.echo(printable(f"model: {pred.name} ({pred.path})"))
    typer.echo(pred.provider_line)
    for path, res in zip(images, pred.results, strict=True):
        typer.echo(printable(path))
        for i, (c, p, n) in enumerate(zip(res.indices, res.probs, res.names, strict=True), 1):
            typer.echo(f"  {i}. {c:4d}  {p:6.1%}  {printable(n)}")  # a hybrid's label names
