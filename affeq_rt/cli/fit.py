"""``affeq-rt fit``: fit affine maps between every ordered pair of models in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import (
    BatchSize,
    Device,
    ExportRoot,
    Labels,
    MaxImages,
    Meta,
    Models,
    Provider,
    Quiet,
    RandomWeights,
    Workers,
    image_options,
)
from affeq_rt.cli.progress import Display
from affeq_rt.errors import AffeqError
from affeq_rt.io.store import open_store
from affeq_rt.method.fit import FitOptions, fit


def run(
    models: Models,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Maps file to write (.safetensors).")],
    data: Annotated[str | None, typer.Option(
        "--data", "-d", show_default=False,
        help="Training images (folder or list file).")] = None,
    features: Annotated[Path | None, typer.Option(
        "--features", "-f", show_default=False,
        help="An existing feature store instead of images.")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="ols | ridge | logit-pinv | adam | naive.")] = "ols",
    max_images: MaxImages = None,
    holdout: Annotated[float, typer.Option(
        "--holdout", help="Fraction held out for R² (and ridge's λ).")] = 0.1,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the held-out split and Adam batches.")] = 0,
    batch_size: BatchSize = 32,
    workers: Workers = 2,
    provider: Provider = "auto",
    device: Device = "auto",
    random_weights: RandomWeights = False,
    labels: Labels = None,
    meta: Meta = None,
    export_root: ExportRoot = None,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Checkpoint the accumulators every N images.")] = 20000,
    iterations: Annotated[int, typer.Option(
        "--iterations", help="Adam steps (method adam).")] = 200,
    lr: Annotated[float, typer.Option(
        "--lr", help="Adam initial learning rate (method adam).")] = 0.1,
    quiet: Quiet = False,
) -> None:
    """Fit a map for every ordered pair A≠B from one pass over the data; resumable (rerun the
    same command after an interruption)."""
    if (data is None) == (features is None):
        raise AffeqError("give exactly one of --data and --features",
                         "fit on images (--data DIR) or on a feature store (--features STORE)")
    source = open_store(features) if features is not None else data
    options = FitOptions(holdout=holdout, seed=seed, max_images=max_images, device=device,
                         checkpoint_every=checkpoint_every, adam_iterations=iterations,
                         adam_lr=lr)
    images = image_options(batch_size, workers, provider, random_weights, export_root, labels,
                           meta)
    with Display(quiet) as display:
        res = fit(source, models, method, out=out, options=options, images=images,
                  progress=display)
    typer.echo(res.summary())
