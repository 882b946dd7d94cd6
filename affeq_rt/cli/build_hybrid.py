"""``affeq-rt build-hybrid``: one verified ONNX model F_A → map → C_B, optionally a Triton repo."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    src: str = typer.Option(..., "--src", help="Source network A (registry name or alias): its "
                            "feature extractor runs."),
    dst: str = typer.Option(..., "--dst", help="Target network B: its classifier labels A's "
                            "mapped features."),
    maps: Path | None = typer.Option(None, "--maps", help="Maps file (affeq-rt fit) holding "
                                     "SRC->DST."),
    fit_on: Path | None = typer.Option(None, "--fit-on", help="Fit the map now on this image "
                                       "folder instead of --maps."),
    method: str = typer.Option("ols", "--method", help="Solver for --fit-on: ols (minimum-norm "
                               "when images < dims) or ridge (λ chosen on held-out images)."),
    holdout: float = typer.Option(0.1, "--holdout", help="Fraction of --fit-on images held out "
                                  "(ridge picks λ on them)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output .onnx (default "
                                    "<src>_to_<dst>.onnx)."),
    fp16: bool = typer.Option(False, "--fp16", help="Store weights and activations in float16 "
                              "(inputs/outputs stay float32)."),
    with_preprocessing: bool = typer.Option(False, "--with-preprocessing", help="Model takes "
                                            "uint8 NHWC RGB images of A's input size and "
                                            "normalises them itself."),
    server_repo: Path | None = typer.Option(None, "--server-repo", help="Also write a Triton "
                                            "model repository here."),
    name: str | None = typer.Option(None, "--name", help="Model name in the repository."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Triton config: TensorRT "
                                  "accelerator (FP16 with --fp16) with an engine cache."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Triton max_batch_size."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Export backbones with "
                                        "random weights (plumbing tests without checkpoints)."),
    export_root: Path | None = typer.Option(None, "--export-root", help="Export cache folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Build one verified ONNX model: A's features → map folded into B's classifier.

    One Gemm holds W_B·M and W_B·m + c_B; outputs logits and probabilities; checked against the
    separate parts on real photos before the file is written.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from affeq_rt.deploy.hybrid import build_hybrid, read_metadata

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("build-hybrid", total=None)

        def say(msg: str) -> None:
            bar.update(task, description=msg)
            bar.console.print(msg)

        path = build_hybrid(src, dst, maps=maps, fit_on=fit_on, method=method, out=out,
                            fp16=fp16, with_preprocessing=with_preprocessing, force=force,
                            server_repo=server_repo, model_name=name, exports_root=export_root,
                            random_weights=random_weights, holdout=holdout, tensorrt=tensorrt,
                            max_batch_size=max_batch_size, progress=say)
    meta = read_metadata(path)["metadata"]
    ver = meta.get("verification", {})
    typer.echo(f"wrote {path}")
    typer.echo(f"verified on {ver.get('n_images')} photos: max relative error "
               f"{ver.get('max_rel', float('nan')):.3g} (tolerance {ver.get('tolerance')}), "
               f"top-1 agrees on {ver.get('top1_agree')}/{ver.get('top1_checked')}")
    if server_repo is not None:
        typer.echo(f"Triton model repository: {server_repo}")
