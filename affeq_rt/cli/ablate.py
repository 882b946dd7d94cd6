"""``affeq-rt ablate``: robustness of networks and hybrids to the seed's input corruptions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import (
    BatchSize,
    ExportRoot,
    Labels,
    MaxImages,
    Models,
    NoiseSeed,
    Offline,
    Provider,
    Quiet,
    RandomWeights,
    image_options,
    model_list,
)
from affeq_rt.errors import AffeqError

#: vis.corrupt.SALT_PEPPER_AMOUNTS as the option's default, written out: importing it loads
#: NumPy for every command's start-up (tests/test_startup.py checks the two agree).
AMOUNTS = "0.0005,0.005,0.05,0.2"


def run(
    models: Models,
    data: Annotated[Path, typer.Option("--data", help="Image folder (class folders = labels), "
                                       "flat folder with --labels, or a list file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for ablation.{json,md,png,"
                                      "html}.")],
    maps: Annotated[Path | None, typer.Option(
        "--maps", metavar="FILE", help="Maps file with every pair of --models: also score "
        "every hybrid A→B.", show_default=False)] = None,
    labels: Labels = None,
    amounts: Annotated[str, typer.Option(
        "--amounts", help="Salt-and-pepper amounts λ (fraction of H·W·C values), "
        "comma-separated.")] = AMOUNTS,
    max_images: MaxImages = None,
    batch_size: BatchSize = 64,
    seed: NoiseSeed = 0,
    provider: Provider = "auto",
    export_root: ExportRoot = None,
    _offline: Offline = False,
    random_weights: RandomWeights = False,
    quiet: Quiet = False,
) -> None:
    """Score networks and hybrids under grayscale, Gaussian blur 3x3/5x5, channel orders BGR/BRG
    and salt-and-pepper noise.

    Each image is decoded once and corrupted once per corruption (before each network's own
    preprocessing; the same noise for every network). Reports top-1 accuracy per corruption
    when the data has labels, else agreement with each network's own clean prediction, and the
    mean confidence; writes a table (Markdown/JSON/HTML) and a plot of score against corruption
    strength (networks and hybrids on one figure). MODELS are registry names or export folders.
    """
    from affeq_rt.cli.progress import Display
    from affeq_rt.vis.ablate import AblateOptions, ablate
    try:
        lam = tuple(float(a) for a in amounts.split(",") if a.strip())
    except ValueError:
        raise AffeqError(f"--amounts {amounts!r} is not a comma-separated list of numbers",
                         "e.g. --amounts 0.0005,0.005") from None
    if any(not 0.0 < a <= 1.0 for a in lam):
        raise AffeqError(f"--amounts {amounts!r} has values outside (0, 1]",
                         "λ is a fraction of the image's values")
    names = model_list(models) or []
    opt = AblateOptions(amounts=lam, max_images=max_images, seed=seed)
    img = image_options(batch_size, None, provider, random_weights, export_root, labels, None)
    with Display(quiet) as display:
        table = ablate(names, data, maps, out=out, options=opt, images=img, progress=display)
    typer.echo(f"{table.n} images, {table.measure} % (mean confidence)")
    typer.echo(table.markdown())
    for p in table.files.values():
        typer.echo(f"wrote {p}")
