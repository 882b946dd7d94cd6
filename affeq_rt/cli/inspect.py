"""``affeq-rt inspect``: print a hybrid model's metadata, inputs and outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import Json
from affeq_rt.io.terminal import printable


def run(
    model: Annotated[Path, typer.Argument(
        metavar="MODEL", help="A .onnx file written by affeq-rt build-hybrid.")],
    as_json: Json = False,
    all_labels: Annotated[bool, typer.Option(
        "--all-labels", help="Print every class name (default: the first five).")] = False,
) -> None:
    """Print a hybrid's metadata: source, target, fit, verification, preprocessing, labels.

    Always recomputes the hybrid's recorded checksums first: a corrupt or modified file is one
    error line saying to rebuild it. Text from the file (names, labels) is printed with control
    characters escaped."""
    from affeq_rt.deploy.metadata import read_metadata
    info = read_metadata(model, verify=True)
    if as_json:  # JSON escapes every control character itself
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    meta, graph = dict(info["metadata"]), info["graph"]
    echo(f"model       {info['path']}")
    echo(f"integrity   {info['integrity']}")
    echo(f"producer    {graph['producer']}  (opset {graph['opset']}, "
               f"IR {graph['ir_version']})")
    for kind in ("inputs", "outputs"):
        for t in graph[kind]:
            echo(f"{kind[:-1]:11s} {t['name']} {t['type']} {t['shape']}")
    if not meta:
        echo("no affeq-rt metadata (not built by affeq-rt build-hybrid)")
        return
    labels = meta.pop("labels", [])
    stats = meta.pop("fit_stats", {})
    meta.pop("checksum", None)  # shown as the integrity line
    for key, value in meta.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        echo(f"{key:11s} {value}")
    short = {k: v for k, v in stats.items() if not isinstance(v, list)}
    echo(f"fit_stats   {json.dumps(short, default=str)}")
    shown = labels if all_labels else labels[:5]
    echo(f"labels      {len(labels)}: {'; '.join(map(str, shown))}"
         + ("" if all_labels or len(labels) <= 5 else "; … (--all-labels for all)"))


def echo(line: str) -> None:
    """One line of the report, everything that came from the file made terminal-safe."""
    typer.echo(printable(line))
