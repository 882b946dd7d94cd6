"""``affeq-rt evaluate``: N×N hybrid table of a feature store under a maps file; reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import (
    Device,
    ExecutorName,
    GpusPerWorker,
    ModelsSubset,
    Quiet,
    RayAddress,
    RayWorkers,
    Verify,
    executor_option,
    model_list,
)
from affeq_rt.errors import AffeqError


def _pairs(specs: list[str]) -> list[tuple[str, str]] | None:
    out = []
    for s in specs:
        a, sep, b = s.replace("->", ":").partition(":")
        if not sep or not a or not b:
            raise AffeqError(f"--pair {s!r} is not A:B", "write the pair as SOURCE:TARGET")
        out.append((a.strip(), b.strip()))
    return out or None


def run(
    features: Annotated[Path, typer.Option(
        "--features", "-f", help="Feature store folder (affeq-rt extract) of the evaluation "
        "images.")],
    maps: Annotated[Path, typer.Option(
        "--maps", help="Maps file (affeq-rt fit) covering every pair of the store's networks.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Report folder: table.md/.csv/.json, heatmap.png, overlap.png, "
        "report.html, per-image pred/correct.")],
    models: ModelsSubset = None,
    pair: Annotated[list[str] | None, typer.Option(
        "--pair", show_default=False, help="Overlap analysis for hybrid A:B (repeatable; "
        "default: the two best networks both ways).")] = None,
    device: Device = "auto",
    title: Annotated[str | None, typer.Option(
        "--title", show_default=False, help="Report title.")] = None,
    executor: ExecutorName = "local",
    address: RayAddress = None,
    ray_workers: RayWorkers = 2,
    gpus_per_worker: GpusPerWorker = 0.0,
    verify: Verify = False,
    similarity: Annotated[Path | None, typer.Option(
        "--similarity", show_default=False, help="similarity.json (affeq-rt similarity) to show "
        "beside the table, correlated with the hybrids' loss.")] = None,
    controls: Annotated[bool, typer.Option(
        "--controls", help="Also score the control hybrids the maps hold (fit --controls: noise "
        "and shuffled-row maps; NETWORK~random features and maps: random weights) in the same "
        "pass, with real − control margins; a hybrid that does not beat its controls is "
        "flagged.")] = False,
    quiet: Quiet = False,
) -> None:
    """Score every hybrid C_B(M F_A) and each network unmapped on a feature store: top-1/top-5, %
    change from the source's own accuracy (thesis Table 5.2), the paper's Loss_{A,B}, overlap of
    correct images; agreement only when the store has no labels. Writes a report folder."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.io.store import open_store
    from affeq_rt.method.evaluate import evaluate
    from affeq_rt.report.controls import controls_text
    from affeq_rt.report.tables import text_table
    from affeq_rt.report.write import fit_extras, write_report
    pairs = _pairs(pair or [])
    ex = executor_option(executor, address, ray_workers, gpus_per_worker, None)
    store = open_store(features, verify=verify)
    with Display(quiet) as display:
        table = evaluate(store, maps, device=device, models=model_list(models),
                         overlap_pairs=pairs, progress=display, executor=ex,
                         controls=controls)
        display.step("writing the report")
        write_report(table, out, title=title, **fit_extras(maps, similarity))
    typer.echo(text_table(table))
    for k, v in table.summary().items():
        typer.echo(f"{k.replace('_', ' ')}: {v:.2f}%")
    if table.controls is not None:
        typer.echo(controls_text(table.controls))
    typer.echo(f"{len(table.models)} networks × {table.n} images on {table.device} in "
               f"{table.seconds:.1f}s; report: {out / 'report.html'}")
