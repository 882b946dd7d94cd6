"""``affeq-rt extract``: run every network over a folder of images into a resumable store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import (
    BatchSize,
    ExecutorName,
    ExportRoot,
    GpusPerWorker,
    Labels,
    MaxImages,
    Meta,
    Offline,
    Preprocessing,
    Provider,
    Quiet,
    RandomWeights,
    RayAddress,
    RayWorkers,
    ShardSize,
    Workers,
    executor_option,
    image_options,
)


def run(
    models: Annotated[str, typer.Option(
        "--models", "-m", help="Comma-separated network names or aliases (A,B,…), in this "
        "order; NAME~random adds NAME's architecture with random weights, in the same pass (the "
        "random-weight control of fit/evaluate --controls).")],
    data: Annotated[str, typer.Option(
        "--data", "-d", help="Image folder (class folders, flat val folder, plain) or a "
        "path,label list file.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Feature store folder to create or resume.")],
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Stored feature dtype: float16|float32.")] = "float16",
    batch_size: BatchSize = 32,
    workers: Workers = None,
    preprocessing: Preprocessing = "exact",
    provider: Provider = "auto",
    max_images: MaxImages = None,
    random_weights: RandomWeights = False,
    labels: Labels = None,
    meta: Meta = None,
    export_root: ExportRoot = None,
    _offline: Offline = False,
    commit_every: Annotated[float, typer.Option(
        "--commit-every", help="Seconds between progress commits.")] = 5.0,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    ray_workers: RayWorkers = 2,
    gpus_per_worker: GpusPerWorker = 0.0,
    shard_size: ShardSize = None,
    stages: Annotated[bool, typer.Option(
        "--stages", help="Also store every network's pooled stages (NAME@s1 …, see affeq-rt "
        "models NAME) for affeq-rt depth; still one decode per image.")] = False,
    quiet: Quiet = False,
) -> None:
    """Extract features of every model for every image (decoded once) into a resumable store.

    Rerun the same command after an interruption to finish the store.
    """
    from affeq_rt.cli.progress import Display
    from affeq_rt.method.extract import ExtractOptions, extract
    images = image_options(batch_size, workers, provider, random_weights, export_root, labels,
                           meta, preprocessing)
    ex = executor_option(executor, address, ray_workers, gpus_per_worker, shard_size)
    with Display(quiet) as display:
        opts = ExtractOptions(dtype=dtype, max_images=max_images, stages=stages,
                              commit_every=commit_every, executor=ex)
        res = extract(models, data, out, options=opts, images=images, progress=display)
    typer.echo(res.summary())
