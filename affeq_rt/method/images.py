"""Networks over images, each image decoded once: the building blocks of ``extract`` and of fit's
image row source (``method.rows.ImageSource``).

:class:`ImageOptions` says how images are read and run; :func:`open_networks` resolves names,
exports (or reuses) each backbone and opens its ``features.onnx``; :func:`feature_batches` streams
(batch, features-per-model) from the decode-once loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
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
from affeq_rt.onnx.exported import default_export_root
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import BackboneSpec, WeightsSource, get_spec


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
    spec: BackboneSpec
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


#: ``NAME~random``: NAME's architecture with random weights, a network of its own (the
#: random-weight negative control of ``method.controls``, issue 22), exported under
#: ``<export root>/RANDOM_EXPORTS`` so that NAME's own export is never replaced.
RANDOM_SUFFIX = "~random"
RANDOM_EXPORTS = "random-weights"


def random_control_of(name: str) -> str | None:
    """The network ``NAME~random`` names (as given), or None for any other name."""
    return name[:-len(RANDOM_SUFFIX)] if name.endswith(RANDOM_SUFFIX) else None


def network_spec(name: str) -> BackboneSpec:
    """The registry spec of a network name, ``NAME~random`` included (NAME's, so renamed, with no
    weights); AffeqError for an unknown name or another control kind."""
    base = random_control_of(name)
    if base is None:
        if "~" in name:
            raise AffeqError(f"{name!r} is not a network: of the controls, only NAME~random has "
                             "features of its own (noise and shuffled are statistics of fit)",
                             "extract NAME~random, and pass --controls to fit and evaluate")
        return get_spec(name)
    spec = get_spec(base)
    return replace(spec, name=spec.name + RANDOM_SUFFIX, aliases=(), weights=WeightsSource(),
                   paper_name=None, expected_top1=None,
                   note=f"{spec.name}'s architecture with random weights (a negative control)")


def parse_models(models: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` or a list → canonical names (``NAME~random`` kept as a name of its own),
    duplicates removed, order kept."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models)]
    out: list[str] = []
    for n in names:
        if not n:
            continue
        c = network_spec(n).name
        if c not in out:
            out.append(c)
    if not out:
        raise AffeqError("no models given", "pass --models A,B,… (see affeq-rt models)")
    return out


def open_networks(models: Sequence[str], provider: str = "auto",
                  export_root: str | os.PathLike | None = None,
                  random_weights: bool = False) -> list[Network]:
    """Export (or reuse the export of) each model and open its features graph; ``NAME~random``
    is NAME exported with random weights into its own folder (:data:`RANDOM_EXPORTS`)."""
    nets = []
    for name in models:
        base = random_control_of(name)
        if base is None:
            exp = ensure_exported(name, root=export_root, random_weights=random_weights)
            spec = exp.spec
        else:
            root = Path(export_root if export_root is not None else default_export_root())
            exp = ensure_exported(base, root=root / RANDOM_EXPORTS, random_weights=True)
            spec = network_spec(name)
        head = exp.classifier_head()
        sess = create_session(exp.features_path, provider=provider)
        nets.append(Network(name, spec, exp.path, sess, head.dim, head, Path(exp.head_path),
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
                    workers: int | None, start: int = 0, pipeline: str = DEFAULT_PIPELINE,
                    device: str | None = None) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Yield (batch, {model: float32 features of its readable images}) from sample ``start``;
    ``device``: where the networks run, for which the loader resolves ``pipeline``."""
    if start >= len(samples):  # a resumed run whose samples were all consumed: nothing left
        return
    specs = [n.spec for n in nets]
    for batch in iter_batches(samples, specs, batch_size=batch_size, workers=workers, start=start,
                              pipeline=pipeline, device=device):
        feats = {n.name: run_network(n, batch.tensors[n.key], batch_size) for n in nets}
        yield batch, feats


def load_data(data: str | os.PathLike | DataSource, labels: str | None = None,
              meta: str | None = None, max_images: int | None = None) -> DataSource:
    """Resolve ``data`` (path or DataSource) with :func:`data.discover`; cut to ``max_images``."""
    src = data if isinstance(data, DataSource) else discover(data, labels=labels, meta=meta)
    return src.head(max_images)
