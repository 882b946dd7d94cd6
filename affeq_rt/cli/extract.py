"""``affeq-rt extract``: run every network over a folder of images into a resumable store."""

from __future__ import annotations

from typing import Optional

import typer


def run(
    models: str = typer.Option(..., "--models", "-m", help="Comma-separated model names (A,B,…)."),
    data: str = typer.Option(..., "--data", "-d",
                             help="Image folder (class folders, flat val folder, plain) or a "
                                  "path,label list file."),
    out: str = typer.Option(..., "--out", "-o", help="Feature store folder to create or resume."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature dtype: float16|float32."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per batch."),
    workers: int = typer.Option(2, "--workers", "-j",
                                help="Decoding processes (0 = decode in this process)."),
    provider: str = typer.Option("auto", "--provider",
                                 help="onnxruntime provider: auto|tensorrt|cuda|cpu."),
    max_images: Optional[int] = typer.Option(None, "--max-images",  # noqa: UP045 (typer)
                                             help="Use only the first N images."),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Export with random weights (tests, benchmarks)."),
    labels: Optional[str] = typer.Option(None, "--labels",  # noqa: UP045
                                         help="Label file for a flat folder (Kaggle "
                                              "LOC_val_solution.csv, devkit ground truth, "
                                              "name,label list)."),
    meta: Optional[str] = typer.Option(None, "--meta",  # noqa: UP045
                                       help="Devkit meta.mat (maps devkit class ids to wnids)."),
    export_root: Optional[str] = typer.Option(None, "--export-root",  # noqa: UP045
                                              help="Export cache folder."),
    commit_every: float = typer.Option(5.0, "--commit-every",
                                       help="Seconds between progress commits."),
) -> None:
    """Extract features of every model for every image (decoded once) into a resumable store.

    Rerun the same command after an interruption to finish the store.
    """
    from affeq_rt.method.extract import extract

    res = extract(models, data, out, dtype=dtype, batch_size=batch_size, workers=workers,
                  provider=provider, max_images=max_images, random_weights=random_weights,
                  export_root=export_root, labels=labels, meta=meta, show_progress=True,
                  commit_every=commit_every)
    typer.echo(res.summary())
