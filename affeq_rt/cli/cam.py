"""``affeq-rt cam``: class activation maps of a network, and of a hybrid through its map."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import ExportRoot, Offline, Provider, Quiet, RandomWeights


def run(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", help="Image files.")],
    src: Annotated[str, typer.Option(
        "--src", help="Source network A: registry name or export folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs, cam.html and "
                                      "cam.json.")],
    dst: Annotated[str | None, typer.Option(
        "--dst", help="Target network B (registry name or export folder): also show B's own "
        "CAM and the hybrid A→B's.", show_default=False)] = None,
    maps: Annotated[Path | None, typer.Option(
        "--maps", metavar="FILE", help="Maps file holding A→B (affeq-rt fit).",
        show_default=False)] = None,
    top: Annotated[int, typer.Option("--top", "-k", help="Classes per image (the hybrid's "
                                     "top classes, or A's without --dst).")] = 3,
    provider: Provider = "auto",
    export_root: ExportRoot = None,
    _offline: Offline = False,
    random_weights: RandomWeights = False,
    quiet: Quiet = False,
) -> None:
    """Class activation maps: where A, B and the hybrid C_B(M·F_A) look, per image.

    Writes one PNG per image (rows: the top classes; columns: A's own CAM, B's own CAM, the
    hybrid's CAM, overlaid on each network's crop, with class names and probabilities), cam.html
    and cam.json (classes, probabilities, map peaks and, per image, the correlation of the
    hybrid's map with each parent's). Needs networks whose classifier follows global average
    pooling (EfficientNet, MobileNetV2, ResNet, Inception…); VGG/AlexNet are refused.
    """
    from affeq_rt.cli.progress import Display
    from affeq_rt.method.extract import ImageOptions
    from affeq_rt.vis.cam import cam
    opt = ImageOptions(provider=provider, export_root=export_root, random_weights=random_weights)
    with Display(quiet) as display:
        res = cam(images, src, dst, maps, out=out, top=top, options=opt, progress=display)
    typer.echo(res.summary())
