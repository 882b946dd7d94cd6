"""Layer views (the seed's interface): several layers' outputs of one network side by side — per
layer the channel mean and the strongest channels, upsampled to the image crop. Layers are
chosen automatically (one per stage: the last output at each spatial resolution) unless named."""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import crop, load_image, preprocess
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from affeq_rt.method.extract import ImageOptions
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.spatial import _onnx, default_stages, float_tensors, open_with_outputs
from affeq_rt.progress import Progress, or_silent
from affeq_rt.vis.common import resolve_export
from affeq_rt.vis.figures import img_tag, layers_png, page
from affeq_rt.vis.results import LayerView, LayerViews


def _run_all(exp: ExportedBackbone, img: Any, provider: str, prog: Progress
             ) -> tuple[dict[str, np.ndarray], list[tuple[str, tuple[int, ...]]]]:
    """One run with every float tensor of ``features.onnx`` as an output: the 4-D ones' arrays
    [C, h, w] and (name, shape) in graph order."""
    candidates = float_tensors(_onnx().load(str(exp.features_path)))
    prog.step(f"running {exp.name} with {len(candidates)} intermediate outputs")
    with tempfile.TemporaryDirectory(prefix="affeq_rt-layers-") as tmp:
        sess = open_with_outputs(exp.features_path, candidates, Path(tmp), provider)
        outs = sess.run_feeds({sess.input_names[0]: preprocess(img, exp.spec)[None]})
    arrays = {n: np.asarray(a)[0] for n, a in zip(sess.output_names, outs, strict=True)
              if n in set(candidates) and np.ndim(a) == 4}
    tensors = [(n, tuple(int(d) for d in arrays[n].shape)) for n in candidates if n in arrays]
    if not tensors:
        raise AffeqError(f"{exp.name}'s features graph has no 4-D feature maps",
                         "layer views need a convolutional network")
    return arrays, tensors


def _write_layers(res: LayerViews, tensors: Sequence[tuple[str, tuple[int, ...]]], channels: int,
                  out: Path) -> dict[str, Path]:
    """``layers.png``, ``layers.html`` and ``layers.json`` (every 4-D tensor) in ``out``."""
    o = ensure_writable_dir(out)
    png = layers_png(res)
    write_bytes_atomic(o / "layers.png", png)
    body = (f"<p>{len(res.layers)} of {len(tensors)} feature maps of {res.network} on "
            f"{Path(res.image).name}: per layer the channel mean and the {channels} channels "
            "with the largest mean activation, each scaled to [0, 1].</p>" +
            img_tag(png, "layers"))
    write_bytes_atomic(o / "layers.html", page(f"Layers of {res.network}", body).encode())
    write_json_atomic(o / "layers.json", {**res.to_dict(),
                                          "tensors": [[n, list(s)] for n, s in tensors]})
    return {"png": o / "layers.png", "html": o / "layers.html", "json": o / "layers.json"}


def layers(network: str | os.PathLike, image: str | os.PathLike, *,
           out: str | os.PathLike | None = None, names: Sequence[str] | None = None,
           channels: int = 6, options: ImageOptions | None = None,
           progress: Progress | None = None) -> LayerViews:
    """Run ``network`` on ``image`` and collect the chosen layers' outputs; with ``out`` writes
    ``layers.png``, ``layers.html`` and ``layers.json``. ``names``: ONNX tensor names of
    ``features.onnx`` (default: one per stage); an unknown name raises AffeqError with the
    closest ones. ``options``: its provider, export root and random weights are used (the image
    is read with the network's exact transform)."""
    if channels < 0:
        raise AffeqError(f"--channels must be ≥ 0, got {channels}",
                         "pass the number of strongest channels to show (0: the mean only)")
    opt = options or ImageOptions()
    img = load_image(image)
    prog = or_silent(progress)
    prog.step(f"opening {network}")
    exp = resolve_export(network, opt.export_root, opt.random_weights)
    arrays, tensors = _run_all(exp, img, opt.provider, prog)
    shapes = dict(tensors)
    chosen = list(names) if names else default_stages(tensors)
    for n in chosen:
        if n not in shapes:
            close = difflib.get_close_matches(n, list(shapes), n=3, cutoff=0.3)
            raise AffeqError(f"{exp.name} has no 4-D tensor {n!r}" +
                             (f" (closest: {', '.join(close)})" if close else ""),
                             "omit --layer to pick one per stage, or see layers.json")
    views = []
    for n in chosen:
        a = arrays[n].astype(np.float64)  # [C, h, w]
        strength = a.mean(axis=(1, 2))
        top = [int(c) for c in np.argsort(-strength, kind="stable")[:channels]]
        views.append(LayerView(n, shapes[n], a.mean(axis=0), top, a[top]))
    res = LayerViews(exp.name, str(image), crop(img, exp.spec), views, len(tensors))
    if out is not None:
        res.files = _write_layers(res, tensors, channels, Path(out))
    return res
