"""``affeq-rt fit``: fit affine maps between every ordered pair of models in one pass."""

from __future__ import annotations

from typing import Optional

import typer


def run(
    models: str = typer.Option(..., "--models", "-m", help="Comma-separated model names (A,B,…)."),
    out: str = typer.Option(..., "--out", "-o", help="Maps file to write (.safetensors)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",  # noqa: UP045 (typer)
                                       help="Training images (folder or list file)."),
    features: Optional[str] = typer.Option(None, "--features", "-f",  # noqa: UP045
                                           help="An existing feature store instead of images."),
    method: str = typer.Option("ols", "--method",
                               help="ols | ridge | logit-pinv | adam | naive."),
    max_images: Optional[int] = typer.Option(None, "--max-images",  # noqa: UP045
                                             help="Use only the first N images."),
    holdout: float = typer.Option(0.1, "--holdout",
                                  help="Fraction held out for R² (and ridge's λ)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and Adam batches."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
    workers: int = typer.Option(2, "--workers", "-j", help="Decoding processes."),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime provider."),
    device: str = typer.Option("auto", "--device", help="Gram accumulator: auto|cpu|cuda."),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Export with random weights (tests, benchmarks)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Label file of a flat folder."),  # noqa: UP045
    meta: Optional[str] = typer.Option(None, "--meta", help="Devkit meta.mat."),  # noqa: UP045
    export_root: Optional[str] = typer.Option(None, "--export-root",  # noqa: UP045
                                              help="Export cache folder."),
    checkpoint_every: int = typer.Option(20000, "--checkpoint-every",
                                         help="Checkpoint the accumulators every N images."),
    iterations: int = typer.Option(200, "--iterations", help="Adam steps (method adam)."),
    lr: float = typer.Option(0.1, "--lr", help="Adam initial learning rate (method adam)."),
) -> None:
    """Fit a map for every ordered pair A≠B from one pass over the data; resumable (rerun the
    same command after an interruption)."""
    from affeq_rt.method.fit import fit

    res = fit(models, out, data=data, features=features, method=method, max_images=max_images,
              holdout=holdout, seed=seed, batch_size=batch_size, workers=workers,
              provider=provider, random_weights=random_weights, export_root=export_root,
              labels=labels, meta=meta, device=device, checkpoint_every=checkpoint_every,
              adam_iterations=iterations, adam_lr=lr, show_progress=True)
    typer.echo(res.summary())
