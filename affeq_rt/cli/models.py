"""``affeq-rt models``: list the backbone registry as a table, or show one spec."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from affeq_rt.cli.options import Json
from affeq_rt.registry.spec import BackboneSpec, get_spec, list_specs

PIPE_WIDTH = 240  # not a terminal and no COLUMNS: every column, one line per model (grep)


def _table(specs: list[BackboneSpec], wide: bool) -> Table:
    """Every column (``wide``) or the essentials; names never wrap or truncate."""
    table = Table(title=f"affeq-rt backbones ({len(specs)})", box=box.SIMPLE_HEAD,
                  caption=None if wide else "affeq-rt models NAME (or --json) shows every field")
    table.add_column("name", no_wrap=True, min_width=max((len(s.name) for s in specs), default=4))
    table.add_column("paper name", no_wrap=True)
    table.add_column("dim", justify="right", no_wrap=True)
    table.add_column("input", no_wrap=not wide, overflow="fold")
    if wide:
        table.add_column("library/arch", overflow="fold")
    table.add_column("weights", overflow="fold")
    if wide:
        table.add_column("aliases", overflow="fold")
    table.add_column("tags", min_width=max((len(t) for s in specs for t in s.tags), default=4))
    for s in specs:
        w = s.weights
        src = {"hub": w.hub, "package": w.package, "file": w.file}.get(w.kind) or "-"
        row = [s.name, s.paper_name or "", str(s.feature_dim)]
        if wide:
            row += [f"{s.input_size} ({s.interpolation}, {s.crop_pct})", f"{s.library}/{s.arch}",
                    f"{w.kind}: {src}", ", ".join(s.aliases[:3])]
        else:
            row += [str(s.input_size), w.kind]
        table.add_row(*row, ", ".join(s.tags))
    return table


def run(
    name: Annotated[str | None, typer.Argument(
        metavar="NAME",
        help="Show this model's full spec.", show_default=False)] = None,
    tag: Annotated[str | None, typer.Option(
        "--tag", show_default=False,
        help="Only models with this tag (thesis, classic, pypi).")] = None,
    as_json: Json = False,
) -> None:
    """List the registered backbones (name, paper name, feature dim, input, library, weights),
    or print one model's spec with its faithfulness note."""
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
    sized = sys.stdout.isatty() or os.environ.get("COLUMNS")
    console = Console(width=None if sized else PIPE_WIDTH)
    table = _table(specs, wide=True)
    unbounded = console.options.update_width(10_000)  # the width every column wants
    if Measurement.get(console, unbounded, table).maximum > console.width:
        table = _table(specs, wide=False)  # every column would wrap: show the essentials
    console.print(table)
