"""Reading an export folder (features.onnx, classifier.onnx, head.safetensors, manifest.json)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import read_json, sha256_file
from affeq_rt.io.heads import Head
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import BackboneSpec

FILES = ("features.onnx", "classifier.onnx", "head.safetensors")


def default_export_root() -> Path:
    """``$AFFEQ_RT_HOME/exports`` (default ``~/.cache/affeq-rt/exports``)."""
    home = os.environ.get("AFFEQ_RT_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "affeq-rt") / "exports"


class ExportedBackbone:
    """An export folder: spec, graph paths, head arrays, manifest; ``verify()`` checks checksums."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise AffeqError(f"{self.path} is not an export folder (no manifest.json)",
                             "run affeq-rt export NAME first")
        self.manifest: dict[str, Any] = read_json(self.path / "manifest.json", "export manifest")
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("spec"), dict):
            raise AffeqError(f"export manifest {self.path / 'manifest.json'} lacks a spec",
                             "re-export it")
        self.spec: BackboneSpec = BackboneSpec.from_dict(self.manifest["spec"],
                                                         source=str(self.path))

    def __repr__(self) -> str:
        return f"ExportedBackbone({str(self.path)!r})"

    @property
    def name(self) -> str:
        """Canonical backbone name."""
        return self.spec.name

    @property
    def features_path(self) -> Path:
        """``features.onnx``: image [N,3,S,S] → features [N,d]."""
        return self.path / "features.onnx"

    @property
    def classifier_path(self) -> Path:
        """``classifier.onnx``: features [N,d] → logits [N,K]."""
        return self.path / "classifier.onnx"

    @property
    def head_path(self) -> Path:
        """``head.safetensors`` with ``weight`` [K,d] and ``bias`` [K]."""
        return self.path / "head.safetensors"

    def head(self) -> Head:
        """The classifier over the graph's outputs, every row as the file holds it (label_offset
        0: a TF-slim background row stays first), e.g. for a hybrid in B's own logit layout."""
        return Head.load(self.head_path)

    def classifier_head(self) -> Head:
        """The classifier in ImageNet class order (the spec's ``label_offset`` rows stripped)."""
        return Head.load(self.head_path, self.spec.label_offset)

    def verify(self) -> None:
        """Raise AffeqError if a file is missing or its checksum differs from the manifest."""
        sums = self.manifest.get("checksums") or {}
        for f in FILES:
            if f not in sums:
                raise AffeqError(f"export {self.path} has no checksum for {f}", "re-export it")
        for f, digest in sums.items():
            p = self.path / f
            if not p.is_file():
                raise AffeqError(f"export {self.path} lacks {f}", "re-export it")
            if sha256_file(p) != digest:
                raise AffeqError(f"export file {p} does not match its checksum", "re-export it")

    def logits(self, x: np.ndarray, provider: str = "auto", batch_size: int = 32,
               fp16: bool = False) -> tuple[np.ndarray, str]:
        """classifier(features(x)) through onnxruntime: (logits [N,K], the provider line)."""
        fs = create_session(self.features_path, provider=provider, fp16=fp16)
        cs = create_session(self.classifier_path, provider=provider, fp16=fp16)
        return cs.run(fs.run(x, batch_size), batch_size), fs.provider_line
