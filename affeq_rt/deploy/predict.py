"""Classify image files with an export folder, a registry name, or a hybrid ONNX file.

Exports use their backbone's own preprocessing; a hybrid uses the preprocessing recorded in its
metadata (its source network's), fed as float NCHW or, for ``--with-preprocessing`` hybrids, as
the uint8 NHWC crops the graph normalises itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affeq_rt.data.labels import TopK, topk
from affeq_rt.data.preprocess import crop, load_image, preprocess
from affeq_rt.deploy.compose import OUTPUTS
from affeq_rt.deploy.metadata import hybrid_preprocessing, read_metadata
from affeq_rt.errors import AffeqError
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.progress import Progress, or_silent
from affeq_rt.registry.spec import get_spec

BATCH_SIZE = 32


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` found: the model (name and path), the provider line, the top-k per image
    and the raw logits [n, K] in the model's own layout."""

    name: str
    path: Path
    provider_line: str
    results: list[TopK]
    logits: np.ndarray


def _decode(images: Sequence[str | os.PathLike]) -> list[Image.Image]:
    if not images:
        raise AffeqError("no images given", "pass one or more image files")
    return [load_image(p) for p in images]  # every file is checked before any model work


def _predict_hybrid(path: Path, images: Sequence[str | os.PathLike], top: int, provider: str,
                    fp16: bool) -> Prediction:
    meta: dict[str, Any] = read_metadata(path)["metadata"]
    if "source" not in meta or "target" not in meta:
        raise AffeqError(f"{path} is not a hybrid built by affeq-rt (no affeq_rt.* metadata)",
                         "pass an export folder, a registry name, or an affeq-rt build-hybrid "
                         "output")
    pre, in_graph = hybrid_preprocessing(meta, path)
    decoded = _decode(images)
    x = np.stack([crop(im, pre) if in_graph else preprocess(im, pre) for im in decoded])
    sess = create_session(path, provider=provider, fp16=fp16 and not meta.get("fp16"))
    logits = sess.run(x, BATCH_SIZE, output=OUTPUTS[0])
    offset = int(meta.get("label_offset", 0))
    labels = meta.get("labels")
    names = labels[offset:] if isinstance(labels, list) and len(labels) == logits.shape[1] \
        else None
    return Prediction(f"{meta['source']}->{meta['target']} hybrid", path, sess.provider_line,
                      topk(logits, top, offset, names), logits)


def predict(target: str | os.PathLike, images: Sequence[str | os.PathLike], top: int = 5,
            provider: str = "auto", export_root: str | os.PathLike | None = None,
            fp16: bool = False, progress: Progress | None = None) -> Prediction:
    """Top-``top`` classes of each image under ``target``: a hybrid ``.onnx`` file, an export
    folder, or a registry name (exported into ``export_root`` on first use)."""
    p = Path(target)
    if p.is_file() or p.suffix.lower() == ".onnx":
        return _predict_hybrid(p, images, top, provider, fp16)
    if p.is_dir():
        exp: ExportedBackbone | None = ExportedBackbone(p)
        exp.verify()
        decoded = _decode(images)
    else:
        spec = get_spec(str(target))  # an unknown name fails before any work
        decoded = _decode(images)
        or_silent(progress).step(f"preparing {spec.name}")
        exp = ensure_exported(spec, root=export_root, progress=progress)
    x = np.stack([preprocess(im, exp.spec) for im in decoded])
    logits, prov = exp.logits(x, provider=provider, batch_size=BATCH_SIZE, fp16=fp16)
    return Prediction(exp.name, exp.path, prov, topk(logits, top, exp.spec.label_offset), logits)
