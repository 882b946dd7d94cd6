"""``affeq-rt build-hybrid``: one verified ONNX model F_A → map → C_B, optionally a Triton repo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import ExportRoot, Force, Quiet, RandomWeights
from affeq_rt.cli.progress import Display
from affeq_rt.deploy.hybrid import HybridOptions, build_hybrid
from affeq_rt.deploy.metadata import read_metadata
from affeq_rt.method.select import quality_line


def run(
    src: Annotated[str, typer.Option(
        "--src", help="Source network A (registry name or alias): its feature extractor runs.")],
    dst: Annotated[str, typer.Option(
        "--dst", help="Target network B: its classifier labels A's mapped features.")],
    maps: Annotated[Path | None, typer.Option(
        "--maps", show_default=False, help="Maps file (affeq-rt fit) holding SRC->DST.")] = None,
    fit_on: Annotated[Path | None, typer.Option(
        "--fit-on", show_default=False,
        help="Fit the map now on this image folder instead of --maps.")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="Solver for --fit-on: auto (by data size: prior-ridge below 2 images "
        "per feature dimension, else ols), ols, ridge, prior-ridge, prior-pca (see affeq-rt fit "
        "--help).")] = "auto",
    holdout: Annotated[float, typer.Option(
        "--holdout", help="Fraction of --fit-on images held out (ridge picks λ on them).")] = 0.1,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Output .onnx (default <src>_to_<dst>.onnx).")] = None,
    fp16: Annotated[bool, typer.Option(
        "--fp16", help="Store weights and activations in float16 (inputs/outputs stay "
        "float32).")] = False,
    with_preprocessing: Annotated[bool, typer.Option(
        "--with-preprocessing", help="Model takes uint8 NHWC RGB images of A's input size and "
        "normalises them itself.")] = False,
    server_repo: Annotated[Path | None, typer.Option(
        "--server-repo", show_default=False,
        help="Also write a Triton model repository here.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", show_default=False, help="Model name in the repository.")] = None,
    tensorrt: Annotated[bool, typer.Option(
        "--tensorrt", help="Triton config: TensorRT accelerator (FP16 with --fp16) with an "
        "engine cache.")] = False,
    max_batch_size: Annotated[int, typer.Option(
        "--max-batch-size", help="Triton max_batch_size.")] = 32,
    random_weights: RandomWeights = False,
    export_root: ExportRoot = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Build one verified ONNX model: A's features → map folded into B's classifier.

    One Gemm holds W_B·M and W_B·m + c_B; outputs logits and probabilities; checked against the
    separate parts on real photos before the file is written.
    """
    options = HybridOptions(fp16=fp16, with_preprocessing=with_preprocessing, force=force,
                            server_repo=server_repo, model_name=name, tensorrt=tensorrt,
                            max_batch_size=max_batch_size)
    with Display(quiet) as display:
        path = build_hybrid(src, dst, maps=maps, fit_on=fit_on, method=method, holdout=holdout,
                            out=out, options=options, export_root=export_root,
                            random_weights=random_weights, progress=display)
    meta = read_metadata(path)["metadata"]
    ver = meta.get("verification", {})
    typer.echo(f"wrote {path}")
    # the fit quality gate: how the map does on held-out images, beside the logit-pinv map
    st = meta.get("fit_stats") or {}
    if st.get("method_choice"):
        typer.echo(f"method auto -> {meta.get('method')}: {st['method_choice']}")
    typer.echo("map quality: " + quality_line(f"{meta.get('source')}->{meta.get('target')}",
                                              str(meta.get("method")), st))
    for w in st.get("warnings", []):
        typer.echo(f"warning: {w}")
    typer.echo(f"graph check (the file against its separate parts, not accuracy): "
               f"{ver.get('n_images')} photos, max relative error "
               f"{ver.get('max_rel', float('nan')):.3g} (tolerance {ver.get('tolerance')}), "
               f"top-1 identical on {ver.get('top1_agree')}/{ver.get('top1_checked')}")
    if server_repo is not None:
        typer.echo(f"Triton model repository: {server_repo}")
