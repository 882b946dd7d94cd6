"""``affeq-rt validate``: each network's own accuracy on a labelled store next to its spec's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import Device, Json, ModelsSubset, model_list


def run(
    features: Annotated[Path, typer.Option(
        "--features", "-f", help="Labelled feature store folder.")],
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Allowed gap in top-1 points (the check also allows 3 binomial "
        "standard errors).")] = 1.0,
    models: ModelsSubset = None,
    device: Device = "auto",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="FILE", show_default=False,
        help="Also write the rows to this JSON file.")] = None,
    as_json: Json = False,
) -> None:
    """Report each network's own top-1/top-5 (thesis Table 5.1) beside the top-1 its registry spec
    expects; flags a gap larger than the tolerance (wrong preprocessing or label order shows up
    here first) and exits 1 if any network is flagged. The store's checksums are always
    recomputed first (a corrupt or modified store is one error line)."""
    from affeq_rt.io.fsio import write_json_atomic
    from affeq_rt.io.store import FeatureStore
    from affeq_rt.method.evaluate import validate
    store = FeatureStore.open(features, verify=True)  # every checksum, before any number
    rows = validate(store, device=device, tolerance=tolerance, models=model_list(models))
    docs = [r.to_dict() for r in rows]
    if out is not None:
        write_json_atomic(out, docs)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
    else:
        typer.echo(f"{'network':28s} {'images':>7s} {'top-1':>7s} {'top-5':>7s} "
                   f"{'expected':>9s} {'gap':>7s} {'allowed':>8s}")
        for r in rows:
            exp = "-" if r.expected_top1 is None else f"{r.expected_top1:.2f}"
            gap = "-" if r.delta is None else f"{r.delta:+.2f}"
            status = {True: "ok", False: "MISMATCH", None: "no expectation"}[r.ok]
            typer.echo(f"{r.model:28s} {r.n:7d} {r.top1:7.2f} {r.top5:7.2f} {exp:>9s} "
                       f"{gap:>7s} {r.tolerance:8.2f}  {status}")
    flagged = [r.model for r in rows if r.ok is False]
    if flagged:
        typer.secho(f"{len(flagged)} network(s) differ from their expected accuracy: "
                    f"{', '.join(flagged)} (check preprocessing, weights and label order)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
