"""Options shared by several commands, defined once so they are spelled and explained alike.

Each is an ``Annotated`` type: ``def run(export_root: ExportRoot = None, ...)``. Conventions:
``--export-root`` is the export cache everywhere; ``--out`` is what a command writes; ``--json``
is a flag that prints JSON on stdout; every input file has its own named option.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # imported where used: the command line starts without them (issue 25)
    from affeq_rt.engine import Executor
    from affeq_rt.method.extract import ImageOptions

# --help groups the shared options in panels (typer's rich_help_panel); a command's own options
# (what it reads and writes, and how) stay first, under "Options".
IMAGES = "Images"
NETWORKS = "Networks and runtime"
CLUSTER = "Cluster (--executor ray)"

EXPORT_ROOT_HELP = ("Export cache folder: backbone NAME lives in EXPORT_ROOT/NAME "
                    "(default $AFFEQ_RT_HOME/exports).")

ExportRoot = Annotated[Path | None, typer.Option(
    "--export-root", help=EXPORT_ROOT_HELP, show_default=False, rich_help_panel=NETWORKS)]


def _go_offline(value: bool) -> bool:
    """``--offline``: from here on, the run downloads nothing (as ``HF_HUB_OFFLINE=1``)."""
    if value:
        from affeq_rt.model.weights import set_offline

        set_offline()
    return value


# Every command that may export a network takes it (name the parameter ``_offline``: the
# callback does the work). timm/Hugging Face download weights on first use; this refuses.
Offline = Annotated[bool, typer.Option(
    "--offline", callback=_go_offline, help="Never download weights (as HF_HUB_OFFLINE=1): a "
    "network whose weights are not cached is refused in one line.", rich_help_panel=NETWORKS)]
Provider = Annotated[str, typer.Option(
    "--provider", help="onnxruntime provider: auto|tensorrt|cuda|cpu (auto: the first that "
    "loads).", rich_help_panel=NETWORKS)]
Device = Annotated[str, typer.Option(
    "--device", help="Compiled-core backend: auto|cpu|cuda.", rich_help_panel=NETWORKS)]
Models = Annotated[str, typer.Option(
    "--models", "-m", help="Comma-separated network names or aliases (A,B,…), in this order.")]
ModelsSubset = Annotated[str | None, typer.Option(
    "--models", "-m", help="Only these networks (comma-separated names or aliases), in this "
    "order.", show_default=False)]
BatchSize = Annotated[int, typer.Option(
    "--batch-size", "-b", help="Images per batch.", rich_help_panel=IMAGES)]
Workers = Annotated[int | None, typer.Option(
    "--workers", "-j", show_default=False,
    help="Decoding processes (0 = decode in this process; default: from the CPUs, in this "
    "process up to 4 of them).", rich_help_panel=IMAGES)]
Preprocessing = Annotated[str, typer.Option(
    "--preprocessing", help="Image decode/resize path: exact (timm's eval transform: published "
    "numbers) | fast (nvjpeg when the networks run on a CUDA GPU and it loads; else "
    "torchvision's libjpeg-turbo decode and antialiased resize where installed, else pillow) | "
    "pillow (region resize, JPEG draft decoding) | torchvision | nvjpeg (JPEGs "
    "decoded on a CUDA GPU by nvJPEG, then exact's resize; needs torch with CUDA and "
    "torchvision). Agreement with exact and speed: docs/BENCHMARKS.md.", rich_help_panel=IMAGES)]
RandomWeights = Annotated[bool, typer.Option(
    "--random-weights", help="Export backbones with random weights (plumbing tests and "
    "benchmarks without checkpoints).", rich_help_panel=NETWORKS)]
Labels = Annotated[Path | None, typer.Option(
    "--labels", metavar="FILE", show_default=False,
    help="Label file of a flat image folder: Kaggle LOC_val_solution.csv, devkit ground truth "
    "or name,label lines.", rich_help_panel=IMAGES)]
Meta = Annotated[Path | None, typer.Option(
    "--meta", metavar="FILE", show_default=False,
    help="Devkit meta.mat (maps devkit class ids to wnids).", rich_help_panel=IMAGES)]
MaxImages = Annotated[int | None, typer.Option(
    "--max-images", help="Use only the first N images.", show_default=False,
    rich_help_panel=IMAGES)]
Fp16 = Annotated[bool, typer.Option(
    "--fp16", help="Run (or store) the graphs in float16; inputs and outputs stay float32.",
    rich_help_panel=NETWORKS)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress display (it is off anyway when stderr is not a "
    "terminal).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Verify = Annotated[bool, typer.Option(
    "--verify", help="Recompute the SHA-256 checksums of the store or hybrid read (sizes and "
    "headers are always checked).")]
ExecutorName = Annotated[str, typer.Option(
    "--executor", help="Where the work runs: local (this process) or ray (a Ray cluster, "
    "docs/SCALING.md; pip install 'affeq-rt\\[ray]').", rich_help_panel=CLUSTER)]
RayAddress = Annotated[str | None, typer.Option(
    "--address", show_default=False, help="With --executor ray: auto (the running cluster) or "
    "HOST:PORT; default: start a local one.", rich_help_panel=CLUSTER)]
RayWorkers = Annotated[int, typer.Option(
    "--ray-workers", help="With --executor ray: worker actors, each keeping its own sessions "
    "(--workers stays the decoding processes, per actor).", rich_help_panel=CLUSTER)]
GpusPerWorker = Annotated[float, typer.Option(
    "--gpus-per-worker", help="With --executor ray: GPUs per worker actor (0.5 packs two on "
    "a GPU).", rich_help_panel=CLUSTER)]
ShardSize = Annotated[int | None, typer.Option(
    "--shard-size", show_default=False, help="With --executor ray: samples per shard, the unit "
    "of scheduling and commit (default 1024 for extract, the checkpoint interval for fit).",
    rich_help_panel=CLUSTER)]

#: Seeds reach NumPy and torch generators: a negative one was a traceback (issue 23).
SEED_RANGE = {"min": 0, "max": 2**32 - 1}
FitSeed = Annotated[int, typer.Option(
    "--seed", **SEED_RANGE, help="Seed of the held-out split and Adam batches.")]
NoiseSeed = Annotated[int, typer.Option(
    "--seed", **SEED_RANGE, help="Seed of the salt-and-pepper noise.")]
DemoSeed = Annotated[int, typer.Option(
    "--seed", **SEED_RANGE, help="Seed of the digits split, training and views.")]
Iterations = Annotated[int, typer.Option(
    "--iterations", min=1, help="Adam steps (method adam).")]


def model_list(models: str | None) -> list[str] | None:
    """``"a, b,c"`` → ``["a", "b", "c"]``; None or empty → None."""
    if not models:
        return None
    return [m.strip() for m in models.split(",") if m.strip()] or None


def opt_str(path: Path | None) -> str | None:
    """A path option as the ``str | None`` the library's older signatures take."""
    return None if path is None else str(path)


def image_options(batch_size: int, workers: int | None, provider: str, random_weights: bool,
                  export_root: Path | None, labels: Path | None, meta: Path | None,
                  pipeline: str = "exact") -> ImageOptions:
    """The shared image-reading options (``extract``, ``fit --data``) as the library's type."""
    from affeq_rt.method.extract import ImageOptions
    return ImageOptions(batch_size=batch_size, workers=workers, provider=provider,
                        random_weights=random_weights, export_root=export_root,
                        labels=opt_str(labels), meta=opt_str(meta), pipeline=pipeline)


def executor_option(executor: str, address: str | None, ray_workers: int,
                    gpus_per_worker: float, shard_size: int | None) -> Executor:
    """The executor the ``--executor`` options name (a LocalExecutor or a RayExecutor)."""
    from affeq_rt.cluster.ray import executor_for
    return executor_for(executor, address=address, workers=ray_workers,
                        gpus_per_worker=gpus_per_worker, shard_size=shard_size)
