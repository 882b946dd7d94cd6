"""Networks over images, each image decoded once: the building blocks of ``extract`` and of fit's
image row source (``method.rows.ImageSource``).

:class:`ImageOptions` says how images are read and run; :func:`open_networks` resolves names,
exports (or reuses) each backbone and opens its ``features.onnx``; :func:`feature_batches` streams
(batch, features-per-model) from the decode-once loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.loader import Batch, iter_batches
from affeq_rt.data.preprocess import DEFAULT_PIPELINE, preprocess_key
from affeq_rt.data.readers import DataSource, discover
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import sha256_file
from affeq_rt.io.heads import Head
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import get_spec


@dataclass(frozen=True)
class ImageOptions:
    """How images are read and run through the networks (``extract`` and ``fit`` on images)."""

    batch_size: int = 32
    workers: int | None = None  # decoding processes (0: this process; None: from the CPUs)
    provider: str = "auto"  # onnxruntime provider: auto|tensorrt|cuda|cpu
    random_weights: bool = False  # export with random weights (tests, benchmarks)
    export_root: str | os.PathLike | None = None  # export cache folder (default: the user's)
    labels: str | None = None  # label file of a flat folder
    meta: str | None = None  # devkit meta.mat
    pipeline: str = DEFAULT_PIPELINE  # decode/resize path: exact (timm's transform) | fast | …


@dataclass
class Network:
    """One opened backbone: canonical name, spec, export folder, ORT session, feature width, its
    classifier (background rows stripped) and the export's head file (copied into stores)."""

    name: str
    spec: Any
    export_dir: Path
    session: Any
    dim: int
    head: Head
    head_path: Path
    onnx_sha256: str

    @property
    def key(self) -> tuple:
        """Preprocessing key: networks with equal keys share one input tensor."""
        return preprocess_key(self.spec)


def parse_models(models: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` or a list → canonical registry names, duplicates removed, order kept."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models)]
    out: list[str] = []
    for n in names:
        if not n:
            continue
        c = get_spec(n).name
        if c not in out:
            out.append(c)
    if not out:
        raise AffeqError("no models given", "pass --models A,B,… (see affeq-rt models)")
    return out


def open_networks(models: Sequence[str], provider: str = "auto",
                  export_root: str | os.PathLike | None = None,
                  random_weights: bool = False) -> list[Network]:
    """Export (or reuse the export of) each model and open its features graph."""
    nets = []
    for name in models:
        path = ensure_exported(name, root=export_root, random_weights=random_weights).path
        exp = ExportedBackbone(path)
        head = exp.classifier_head()
        sess = create_session(exp.features_path, provider=provider)
        nets.append(Network(name, exp.spec, path, sess, head.dim, head, Path(exp.head_path),
                            sha256_file(exp.features_path)))
    return nets


def spec_dict(spec: Any) -> dict[str, Any]:
    """A spec as plain JSON (BackboneSpec or dict)."""
    return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def run_network(net: Network, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of one network on one preprocessed batch, float32 [r, d]."""
    if x.shape[0] == 0:
        return np.zeros((0, net.dim), np.float32)
    out = np.asarray(net.session.run(x, batch_size=batch_size), np.float32)
    if out.ndim != 2 or out.shape != (x.shape[0], net.dim):
        raise AffeqError(f"{net.name}'s features graph returned shape {out.shape}, expected "
                         f"({x.shape[0]}, {net.dim})", "re-export the model (affeq-rt export)")
    return out


def feature_batches(nets: Sequence[Network], samples: Sequence[Any], batch_size: int,
                    workers: int | None, start: int = 0, pipeline: str = DEFAULT_PIPELINE
                    ) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Yield (batch, {model: float32 features of its readable images}) from sample ``start``."""
    if start >= len(samples):  # a resumed run whose samples were all consumed: nothing left
        return
    specs = [n.spec for n in nets]
    for batch in iter_batches(samples, specs, batch_size=batch_size, workers=workers, start=start,
                              pipeline=pipeline):
        feats = {n.name: run_network(n, batch.tensors[n.key], batch_size) for n in nets}
        yield batch, feats


def load_data(data: str | os.PathLike | DataSource, labels: str | None = None,
              meta: str | None = None, max_images: int | None = None) -> DataSource:
    """Resolve ``data`` (path or DataSource) with :func:`data.discover`; cut to ``max_images``."""
    src = data if isinstance(data, DataSource) else discover(data, labels=labels, meta=meta)
    return src.head(max_images)
