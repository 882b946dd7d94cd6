"""``affeq-rt build-hybrid``: one verified ONNX model F_A → map → C_B, optionally a Triton repo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from affeq_rt.cli.options import ExportRoot, Force, Offline, Quiet, RandomWeights


def run(
    src: Annotated[str, typer.Option(
        "--src", help="Source network A (registry name or alias): its feature extractor runs.")],
    dst: Annotated[str, typer.Option(
        "--dst", help="Target network B: its classifier labels A's mapped features.")],
    maps: Annotated[Path | None, typer.Option(
        "--maps", show_default=False, help="Maps file (affeq-rt fit) holding SRC->DST. "
        "Without --maps and --fit-on: the data-free logit-pinv map (no images).")] = None,
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
    _offline: Offline = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Build one verified ONNX model: A's features → map folded into B's classifier.

    The map is a maps file (--maps), fitted on images (--fit-on), or, given neither, the
    data-free logit-pinv map. One Gemm holds W_B·M and W_B·m + c_B; outputs logits and
    probabilities; checked against the separate parts on real photos before the file is written.
    """
    from affeq_rt.cli.progress import Display
    from affeq_rt.deploy.from_names import DATA_FREE, FitOn, hybrid
    from affeq_rt.deploy.hybrid import HybridOptions
    from affeq_rt.deploy.metadata import read_metadata
    from affeq_rt.method.extract import ImageOptions
    from affeq_rt.method.fit import FitOptions
    from affeq_rt.method.quality import quality_line
    options = HybridOptions(fp16=fp16, with_preprocessing=with_preprocessing, force=force,
                            server_repo=server_repo, model_name=name, tensorrt=tensorrt,
                            max_batch_size=max_batch_size)
    images = ImageOptions(random_weights=random_weights, export_root=export_root)
    with Display(quiet) as display:
        plan = None if fit_on is None else FitOn(fit_on, method, FitOptions(holdout=holdout))
        path = hybrid(src, dst, maps=maps, fit_on=plan, out=out, options=options, images=images,
                      progress=display)
    meta = read_metadata(path)["metadata"]
    ver = meta.get("verification", {})
    typer.echo(f"wrote {path}")
    st = meta.get("fit_stats") or {}
    if maps is None and fit_on is None:  # no held-out images to score it on: what it is instead
        how = ("exactly: B has no more classes than features" if st.get("logits_exact") else
               f"up to a {st.get('logit_rel_error', float('nan')):.2g} relative logit error: B "
               "has more classes than features")
        typer.echo("map: " + DATA_FREE.format(how=how))
    else:  # the fit quality gate: the map on held-out images, beside the logit-pinv map
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
