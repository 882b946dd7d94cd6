"""``affeq-rt models``: list the backbone registry as a table, or show one spec."""

from __future__ import annotations

import json
from typing import Optional

import typer


def run(
    name: Optional[str] = typer.Argument(None, help="Show this model's full spec."),  # noqa: UP045
    tag: Optional[str] = typer.Option(None, "--tag",  # noqa: UP045 (typer)
                                      help="Only models with this tag (thesis, classic, pypi)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registered backbones (name, paper name, library, input, feature dim, weights),
    or print one model's spec with its faithfulness note."""
    from affeq_rt.registry.spec import get_spec, list_specs

    if name is not None:
        spec = get_spec(name)
        if as_json:
            typer.echo(json.dumps(spec.to_dict(), indent=2))
            return
        d = spec.to_dict()
        note = d.pop("note")
        for k, v in d.items():
            typer.echo(f"{k:14s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        typer.echo(f"{'note':14s} {note}")
        return
    specs = list_specs(tag)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in specs], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"affeq-rt backbones ({len(specs)})")
    for col in ("name", "paper name", "aliases", "library/arch", "input", "dim", "weights", "tags"):
        table.add_column(col)
    for s in specs:
        w = s.weights
        src = {"hub": w.hub, "package": w.package, "file": w.file}.get(w.kind) or "-"
        table.add_row(s.name, s.paper_name or "", ", ".join(s.aliases[:3]),
                      f"{s.library}/{s.arch}", f"{s.input_size} ({s.interpolation}, {s.crop_pct})",
                      str(s.feature_dim), f"{w.kind}: {src}", ",".join(s.tags))
    import sys

    Console(width=None if sys.stdout.isatty() else 200).print(table)
