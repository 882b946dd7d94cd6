"""``affeq-rt fit``: fit affine maps between every ordered pair of models in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import (
    NETWORKS,
    BatchSize,
    Device,
    ExecutorName,
    ExportRoot,
    FitSeed,
    GpusPerWorker,
    Iterations,
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
    Verify,
    Workers,
    executor_option,
    image_options,
)
from affeq_rt.errors import AffeqError

STATS = "Statistics of the same pass"


def run(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Maps file to write (.safetensors).")],
    data: Annotated[str | None, typer.Option(
        "--data", "-d", show_default=False,
        help="Training images (folder or list file).")] = None,
    features: Annotated[Path | None, typer.Option(
        "--features", "-f", show_default=False,
        help="An existing feature store instead of images.")] = None,
    models: Annotated[str | None, typer.Option(
        "--models", "-m", show_default=False,
        help="Comma-separated network names or aliases (A,B,…; with --data, NAME~random: NAME "
        "with random weights); with --features, default: every network of the store.")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="auto (by data size: ols, or prior-ridge when there are fewer than 2 "
        "training images per feature dimension; the summary says which and why) | ols | ridge | "
        "prior-ridge | prior-pca (shrunk toward logit-pinv, strength by grouped "
        "cross-validation) | logit-pinv | adam | naive | orthogonal (Procrustes with scale and "
        "offset) | low-rank (reduced-rank affine, --rank or chosen on the held-out images); "
        "orthogonal and low-rank print the affine map's held-out R² beside theirs.")] = "auto",
    rank: Annotated[int | None, typer.Option(
        "--rank", show_default=False,
        help="Rank of the low-rank map (default: chosen on the held-out images).")] = None,
    max_images: MaxImages = None,
    holdout: Annotated[float, typer.Option(
        "--holdout", help="Fraction held out for R² (and ridge's λ).")] = 0.1,
    seed: FitSeed = 0,
    batch_size: BatchSize = 32,
    workers: Workers = None,
    preprocessing: Preprocessing = "exact",
    provider: Provider = "auto",
    device: Device = "auto",
    random_weights: RandomWeights = False,
    labels: Labels = None,
    meta: Meta = None,
    export_root: ExportRoot = None,
    _offline: Offline = False,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Checkpoint the accumulators every N images.",
        rich_help_panel=NETWORKS)] = 20000,
    iterations: Iterations = 200,
    lr: Annotated[float, typer.Option(
        "--lr", help="Adam initial learning rate (method adam).")] = 0.1,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    ray_workers: RayWorkers = 2,
    gpus_per_worker: GpusPerWorker = 0.0,
    shard_size: ShardSize = None,
    verify: Verify = False,
    curve: Annotated[str, typer.Option(
        "--curve", help="Data-efficiency curve: training-image counts at which the one pass "
        "snapshots the Gram and scores every map (e.g. 1000,2000,4000), auto (doubling from "
        "1000) or off. Needs a feature store; writes MAPS.curve.json/.csv/.png.",
        rich_help_panel=STATS)] = "auto",
    no_curve: Annotated[bool, typer.Option("--no-curve", help="No data-efficiency curve.",
                                           rich_help_panel=STATS)] = False,
    similarity: Annotated[bool, typer.Option(
        "--similarity", help="Also CKA, debiased CKA, CCA, SVCCA, R² and Procrustes of every "
        "pair from this fit's Gram (ols/ridge); writes MAPS.similarity.json/.md/.csv, which "
        "evaluate --maps MAPS shows.", rich_help_panel=STATS)] = False,
    controls: Annotated[bool, typer.Option(
        "--controls", help="Also fit negative controls from the same pass (Gram and prior-* "
        "methods, by the fit's estimator): per pair a map from clustered noise tied to the "
        "target's class and one from mismatched (shuffled) image pairs, saved as "
        "NETWORK~noise/NETWORK~shuffled pairs; evaluate --controls scores them.",
        rich_help_panel=STATS)] = False,
    no_dedup: Annotated[bool, typer.Option(
        "--no-dedup", help="Do not look for near-duplicate images (crops, flips, re-encodings "
        "of one photo, found from the networks' features) to hold out and cross-validate "
        "together; groups then come from file names only (NAME__VIEW.ext).",
        rich_help_panel=STATS)] = False,
    quiet: Quiet = False,
) -> None:
    """Fit a map for every ordered pair A≠B from one pass over the data; resumable (rerun the
    same command after an interruption)."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.io.store import open_store
    from affeq_rt.method.fit import FitOptions, fit
    from affeq_rt.report.curve import curve_text, write_curve
    from affeq_rt.report.similarity import similarity_text, write_similarity
    if (data is None) == (features is None):
        raise AffeqError("give exactly one of --data and --features",
                         "fit on images (--data DIR) or on a feature store (--features STORE)")
    if data is not None and not models:
        raise AffeqError("fit --data needs the networks to run on the images",
                         "pass --models A,B[,…] (see affeq-rt models)")
    source = open_store(features, verify=verify) if features is not None else data
    options = FitOptions(holdout=holdout, seed=seed, max_images=max_images, device=device,
                         checkpoint_every=checkpoint_every, adam_iterations=iterations,
                         adam_lr=lr,
                         executor=executor_option(executor, address, ray_workers,
                                                  gpus_per_worker, shard_size),
                         curve="off" if no_curve else curve, similarity=similarity,
                         dedup=not no_dedup, rank=rank, controls=controls)
    images = image_options(batch_size, workers, provider, random_weights, export_root, labels,
                           meta, preprocessing)
    with Display(quiet) as display:
        res = fit(source, models, method, out=out, options=options, images=images,
                  progress=display)
        if res.curve is not None:
            display.step("writing the data-efficiency curve")
            curve_files = write_curve(res.curve, out)
        if res.similarity is not None:
            sim_files = write_similarity(res.similarity, out, beside_maps=True)
    typer.echo(res.summary())
    if res.curve is not None:
        typer.echo(curve_text(res.curve))
        typer.echo(f"curve: {curve_files['csv']}, {curve_files['json'].name}, "
                   f"{curve_files['png'].name}")
    if res.similarity is not None:
        typer.echo(similarity_text(res.similarity))
        typer.echo(f"similarity: {sim_files['json']}, {sim_files['markdown'].name}, "
                   f"{sim_files['csv'].name}")
