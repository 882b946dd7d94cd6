"""``affeq-rt validate``: each network's own accuracy on a labelled store next to its spec's."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    features: Path = typer.Option(..., "--features", "-f", help="Labelled feature store folder."),
    tolerance: float = typer.Option(1.0, "--tolerance", help="Allowed gap in top-1 points (the "
                                    "check also allows 3 binomial standard errors)."),
    device: str = typer.Option("auto", "--device", help="Evaluator backend: auto|cpu|cuda."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Report each network's own top-1/top-5 (thesis Table 5.1) beside the top-1 its registry spec
    expects; flags a gap larger than the tolerance (wrong preprocessing or label order shows up
    here first) and exits 1 if any network is flagged."""
    from affeq_rt.io.fsio import write_json_atomic
    from affeq_rt.method.evaluate import validate

    rows = validate(features, device=device, tolerance=tolerance)
    typer.echo(f"{'network':28s} {'images':>7s} {'top-1':>7s} {'top-5':>7s} {'expected':>9s} "
               f"{'gap':>7s} {'allowed':>8s}")
    flagged = []
    for r in rows:
        exp = "-" if r.expected_top1 is None else f"{r.expected_top1:.2f}"
        gap = "-" if r.delta is None else f"{r.delta:+.2f}"
        status = {True: "ok", False: "MISMATCH", None: "no expectation"}[r.ok]
        typer.echo(f"{r.model:28s} {r.n:7d} {r.top1:7.2f} {r.top5:7.2f} {exp:>9s} {gap:>7s} "
                   f"{r.tolerance:8.2f}  {status}")
        if r.ok is False:
            flagged.append(r.model)
    if json_out is not None:
        write_json_atomic(json_out, [r.to_dict() for r in rows])
    if flagged:
        typer.secho(f"{len(flagged)} network(s) differ from their expected accuracy: "
                    f"{', '.join(flagged)} (check preprocessing, weights and label order)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
