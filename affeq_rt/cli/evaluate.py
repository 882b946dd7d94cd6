"""``affeq-rt evaluate``: N×N hybrid table of a feature store under a maps file; reports."""

from __future__ import annotations

from pathlib import Path

import typer

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
    features: Path = typer.Option(..., "--features", "-f", help="Feature store folder "
                                  "(affeq-rt extract) of the evaluation images."),
    maps: Path = typer.Option(..., "--maps", help="Maps file (affeq-rt fit) covering every pair "
                              "of the store's networks."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: table.md/.csv/.json, "
                             "heatmap.png, overlap.png, report.html, per-image pred/correct."),
    models: str | None = typer.Option(None, "--models", "-m", help="Only these networks "
                                      "(comma-separated), in this order."),
    pair: list[str] = typer.Option([], "--pair", help="Overlap analysis for hybrid A:B "
                                   "(repeatable; default: the two best networks both ways)."),
    device: str = typer.Option("auto", "--device", help="Evaluator backend: auto|cpu|cuda."),
    title: str | None = typer.Option(None, "--title", help="Report title."),
) -> None:
    """Score every hybrid C_B(M F_A) and each network unmapped on a feature store: top-1/top-5, %
    change from the source's own accuracy (thesis Table 5.2), the paper's Loss_{A,B}, overlap of
    correct images; agreement only when the store has no labels. Writes a report folder."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from affeq_rt.io.store import open_store
    from affeq_rt.method.evaluate import evaluate
    from affeq_rt.report.write import text_table

    store = open_store(features)
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    total = len(names or store.models)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} sources"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("evaluate", total=total)
        seen: list[str] = []

        def step(src: str) -> None:
            if seen:
                bar.advance(task)
            seen.append(src)
            bar.update(task, description=f"evaluate: source {src}")

        table = evaluate(store, maps, out=out, device=device, models=names,
                         overlap_pairs=_pairs(pair), progress=step, title=title)
        bar.advance(task)
    typer.echo(text_table(table))
    for k, v in table.summary().items():
        typer.echo(f"{k.replace('_', ' ')}: {v:.2f}%")
    typer.echo(f"{len(table.models)} networks × {table.n} images on {table.device} in "
               f"{table.seconds:.1f}s; report: {out / 'report.html'}")
