"""``affeq-rt layers``: several layers' outputs of one network side by side, for one image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import ExportRoot, Offline, Provider, Quiet, RandomWeights


def run(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name or export folder.")],
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="Image file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for layers.png, layers.html "
                                      "and layers.json.")],
    layer: Annotated[list[str] | None, typer.Option(
        "--layer", "-l", help="ONNX tensor name of a layer to show (repeatable; default: one "
        "per stage). layers.json lists every 4-D tensor.", show_default=False)] = None,
    channels: Annotated[int, typer.Option("--channels", "-c", help="Strongest channels shown "
                                          "per layer (0: the channel mean only).")] = 6,
    provider: Provider = "auto",
    export_root: ExportRoot = None,
    _offline: Offline = False,
    random_weights: RandomWeights = False,
    quiet: Quiet = False,
) -> None:
    """Show several layers of one network side by side: per layer the channel mean and the
    strongest channels, upsampled to the image crop.

    Layers are chosen automatically, one per stage (the last feature map at each spatial
    resolution), unless named with --layer.
    """
    from affeq_rt.cli.progress import Display
    from affeq_rt.method.extract import ImageOptions
    from affeq_rt.vis.layers import layers
    opt = ImageOptions(provider=provider, export_root=export_root, random_weights=random_weights)
    with Display(quiet) as display:
        res = layers(name, image, out=out, names=layer or None, channels=channels, options=opt,
                     progress=display)
    typer.echo(f"{res.network}: {len(res.layers)} of {res.available} feature maps")
    for v in res.layers:
        typer.echo(f"  {v.name}  {v.shape[0]}x{v.shape[1]}x{v.shape[2]}")
    for p in res.files.values():
        typer.echo(f"wrote {p}")
