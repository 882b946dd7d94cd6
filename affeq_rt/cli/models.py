"""``affeq-rt models``: list the backbone registry as a table, show one spec (curated, or resolved
from timm/torchvision), or list every resolvable library name (``--all [PATTERN]``)."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from affeq_rt.cli.options import Json
from affeq_rt.errors import AffeqError

if TYPE_CHECKING:  # the library is imported where used: --help stays light (issue 25)
    from affeq_rt.registry.spec import BackboneSpec

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


def _all(pattern: str | None, as_json: bool) -> None:
    """Every resolvable timm/torchvision name matching ``pattern``: one line each (name, library,
    label set, weights offline, curated), a count on stderr."""
    from affeq_rt.registry.resolve import list_resolvable
    from affeq_rt.registry.spec import list_specs
    curated = {s.arch.lower(): s.name for s in list_specs() if s.library != "affeq"}
    curated |= {s.weights.hub.split("/", 1)[1].lower(): s.name for s in list_specs()
                if s.weights.kind == "hub" and s.weights.hub}
    rows = list_resolvable(pattern)
    if as_json:
        typer.echo(json.dumps([{"name": r.name, "library": r.library, "labels": r.label_set,
                                "weights_offline": r.weights_offline,
                                "curated": curated.get(r.name.lower())} for r in rows], indent=2))
        return
    width = max((len(r.name) for r in rows), default=4)
    typer.echo(f"{'name':{width}s}  {'library':11s}  {'offline':7s}  labels / curated spec")
    for r in rows:
        mark = curated.get(r.name.lower())
        labels = (r.label_set if r.imagenet_1k or r.label_set.startswith("none")
                  else f"{r.label_set} (agreement mode only)")
        typer.echo(f"{r.name:{width}s}  {r.library:11s}  {'yes' if r.weights_offline else '-':7s}"
                   f"  {labels}{f'  [curated: {mark}]' if mark else ''}")
    n_1k = sum(r.imagenet_1k for r in rows)
    typer.echo(f"{len(rows)} names ({n_1k} ImageNet-1k, "
               f"{sum(r.weights_offline for r in rows)} with weights offline); "
               "`affeq-rt models NAME` shows one", err=True)


def _stages(spec: BackboneSpec) -> None:
    """One line per stage (``affeq-rt depth`` and stage extraction use them), from a shapes-only
    forward; a network without findable stages says why in one line."""
    from affeq_rt.onnx.stages import list_stages, stage_model
    try:
        stages = list_stages(spec)
    except AffeqError as e:
        typer.echo(f"{'stages':14s} none ({e.problem})")
        return
    for s in stages:
        where = "×".join(map(str, s.size)) + (" tokens" if s.pool == "tokens" else "")
        typer.echo(f"{'stage ' + s.name:14s} {s.module} → {s.dim} pooled ({s.pool}"
                   f"{', ' + where if where else ''})  "
                   f"store model {stage_model(spec.name, s.name)}")


def run(
    name: Annotated[str | None, typer.Argument(
        metavar="NAME",
        help="Show this model's full spec (a curated name, or any timm name like "
        "convnext_tiny[.fb_in1k], or torchvision/resnet50[.IMAGENET1K_V2]); with --all, an "
        "fnmatch PATTERN like 'vit_*'.", show_default=False)] = None,
    tag: Annotated[str | None, typer.Option(
        "--tag", show_default=False,
        help="Only models with this tag (thesis, classic, pypi).")] = None,
    all_names: Annotated[bool, typer.Option(
        "--all", help="List every timm pretrained tag and torchvision weight that resolves "
        "(NAME is then a pattern), marking curated ones and weights in the local cache.")] = False,
    other_labels: Annotated[bool, typer.Option(
        "--other-labels", help="Agreement mode: accept heads over other label sets than "
        "ImageNet-1k (21k, …); other commands: set AFFEQ_RT_OTHER_LABELS=1.")] = False,
    as_json: Json = False,
) -> None:
    """List the registered backbones (name, paper name, feature dim, input, library, weights),
    print one model's spec (curated, or resolved from timm/torchvision metadata), or list every
    resolvable name (--all)."""
    from affeq_rt.registry.spec import get_spec, list_specs
    if all_names:
        _all(name, as_json)
        return
    if name is not None:
        spec = get_spec(name, allow_other_labels=other_labels or None)
        if as_json:
            typer.echo(json.dumps(spec.to_dict(), indent=2))
            return
        d = spec.to_dict()
        note = d.pop("note")
        for k, v in d.items():
            typer.echo(f"{k:14s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        typer.echo(f"{'note':14s} {note}")
        _stages(spec)
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
