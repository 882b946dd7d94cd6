"""``affeq-rt depth``: layer by layer — stage × stage similarity and the depth curves (with their
controls) of two networks (or one against itself) from a stage store (``affeq-rt extract
--stages``), one Gram pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import Device, FitSeed, Quiet, model_list
from affeq_rt.errors import AffeqError

#: method.depth.METHODS, written out: importing it loads NumPy for every command's start-up
#: (tests/test_startup.py checks the two agree).
METHODS = ("ols", "ridge", "orthogonal", "low-rank")


def run(
    features: Annotated[Path, typer.Option(
        "--features", "-f", help="Feature store with stages (affeq-rt extract --stages).")],
    models: Annotated[str, typer.Option(
        "--models", "-m", help="A,B: the source and target networks as the store names them "
        "(one name: a network against itself).")],
    test: Annotated[Path | None, typer.Option(
        "--test", help="A stage store of other images to score the curves on (default: the "
        "held-out images of --features).", show_default=False)] = None,
    method: Annotated[str, typer.Option(
        "--method", help=f"Map family (or several, comma-separated: one curve each) solved "
        f"from the Gram, as fit solves it: {', '.join(METHODS)}.")] = "ols",
    rank: Annotated[int | None, typer.Option(
        "--rank", help="low-rank: the map's rank (default: chosen on the held-out images).",
        show_default=False)] = None,
    holdout: Annotated[float, typer.Option(
        "--holdout", help="Fraction held out (fit's split): the maps never see it.")] = 0.1,
    seed: FitSeed = 0,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Folder for depth.json/.csv/.md, cka.csv and (unless --no-figures) depth.png, "
        "cka.png, depth.html.")] = None,
    figures: Annotated[bool, typer.Option(
        "--figures/--no-figures", help="Write the PNG heatmap, curves and HTML page.")] = True,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Where in network A does network B's classifier become usable? For every stage of A, the
    affine map to B's features scored through B's unchanged classifier on held-out images,
    beside its controls (shuffled pairs; A with random weights when stored), and every
    similarity measure of every pair of stages; exact, from one pass over the stored rows."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.method.depth import layer_analysis
    from affeq_rt.method.fit import FitOptions
    from affeq_rt.report.depth import cka_text, depth_text, write_depth
    names = model_list(models) or []
    if len(names) not in (1, 2):
        raise AffeqError(f"--models takes one or two networks, got {len(names)}",
                         "pass --models A,B (or one name for a network against itself)")
    with Display(quiet) as display:
        la = layer_analysis(features, names[0], names[-1], test=test, method=method,
                            options=FitOptions(holdout=holdout, seed=seed, device=device,
                                               rank=rank),
                            progress=display)
    typer.echo(depth_text(la))
    typer.echo("")
    typer.echo(cka_text(la))
    if out is not None:
        paths = write_depth(la, out, figures=figures)
        typer.echo("written: " + ", ".join(str(p) for p in paths.values()))
