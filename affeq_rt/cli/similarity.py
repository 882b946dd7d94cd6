"""``affeq-rt similarity``: CKA, debiased CKA, CCA, SVCCA, R² and Procrustes of every pair of a
feature store's networks, exact from one Gram pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import (
    Device,
    ExecutorName,
    GpusPerWorker,
    MaxImages,
    ModelsSubset,
    Quiet,
    RayAddress,
    RayWorkers,
    ShardSize,
    executor_option,
    model_list,
)


def run(
    features: Annotated[Path, typer.Option(
        "--features", "-f", help="Feature store folder (affeq-rt extract).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Folder for similarity.json/.md/.csv (give the JSON to evaluate --similarity).")]
    = None,
    models: ModelsSubset = None,
    max_images: MaxImages = None,
    device: Device = "auto",
    executor: ExecutorName = "local",
    address: RayAddress = None,
    ray_workers: RayWorkers = 2,
    gpus_per_worker: GpusPerWorker = 0.0,
    shard_size: ShardSize = None,
    permutations: Annotated[int, typer.Option(
        "--permutations", help="K > 0: each Gram measure's permutation null from the same pass "
        "(K within-chunk row permutations): null mean, calibrated score (raw − null mean) and "
        "empirical p-value per pair. Costs K cross blocks per pair and K solves.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Compare every pair of networks in a feature store: linear and debiased CKA, canonical
    correlations (mean, SVCCA), R² of the OLS map both ways and the orthogonal Procrustes distance,
    exact over every image from one pass (no n×n kernels)."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.io.store import open_store
    from affeq_rt.method.similarity import similarity
    from affeq_rt.report.answer import answer_rows, answer_text
    from affeq_rt.report.similarity import similarity_text, write_similarity
    ex = executor_option(executor, address, ray_workers, gpus_per_worker, shard_size)
    store = open_store(features)
    with Display(quiet) as display:
        sim = similarity(store, model_list(models), max_images=max_images, device=device,
                         progress=display, executor=ex, permutations=permutations)
    typer.echo(similarity_text(sim))
    typer.echo("\n" + answer_text(answer_rows(None, sim)))  # per pair, in one place (issue 22)
    if out is not None:
        paths = write_similarity(sim, out)
        typer.echo(f"written: {paths['json']}, {paths['markdown'].name}, {paths['csv'].name}")
