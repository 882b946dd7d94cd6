"""Hybrid models for deployment: A's feature graph + B's classifier with the affine map folded in.

``build_hybrid(amap, a, b, out=…, options=HybridOptions(…))`` composes the map ``amap`` (A→B) with
the exports ``a`` and ``b`` (:class:`~affeq_rt.onnx.exported.ExportedBackbone`); it never fits
(:mod:`~affeq_rt.deploy.from_names` goes from network names to a hybrid). It writes ONE ONNX file
computing ``softmax(W_B (M F_A(x) + m) + c_B)``: A's exported ``features.onnx`` (every name
prefixed ``a/``) followed by one Gemm whose weights ``W_B·M`` and bias ``W_B·m + c_B`` are folded in
float64 (:mod:`~affeq_rt.deploy.compose`). It has the named outputs ``logits`` and
``probabilities`` in B's own logit layout (a TF-slim background row stays first), a dynamic batch
dimension, and metadata (:mod:`~affeq_rt.deploy.metadata`) saying how it was made. Before the file
appears it is checked against ``C_B(M·F_A(x))`` from the separate parts
(:mod:`~affeq_rt.deploy.verify`).

Input layouts:
  * default: ``image`` float32 ``[N, 3, S, S]``, already preprocessed (``data.preprocess``);
  * ``with_preprocessing=True``: ``image`` uint8 ``[N, S, S, 3]`` (NHWC, RGB, resized and centre-
    cropped to S = A's input size, as decoded images usually are); the graph does A's
    ``/255 − mean ÷ std`` and the NHWC→NCHW transpose itself, in the same float32 order as
    ``preprocess.normalize``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt._version import __version__
from affeq_rt.deploy.compose import MIN_OPSET, compose_hybrid, save_model, too_big_for_memory
from affeq_rt.deploy.metadata import (
    default_model_name,
    label_names,
    preprocessing_record,
    read_metadata,
    set_metadata,
    stamp_checksum,
)
from affeq_rt.deploy.triton import Serving, check_repo_target, write_model_repository
from affeq_rt.deploy.verify import reference_logits, verification_inputs, verify
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path, check_free_space
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, fold_head
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import half_model
from affeq_rt.progress import Progress, or_silent
from affeq_rt.registry.spec import BackboneSpec


@dataclass(frozen=True)
class HybridOptions:
    """How to build and write a hybrid (everything except what it is made of).

    ``tolerance`` None: ``verify.TOL_FP32`` / ``TOL_FP16``. ``server_repo`` also writes a Triton
    model repository (``model_name``, ``tensorrt``, ``max_batch_size`` configure it). ``force``
    replaces an existing output file or repository model folder.
    """

    fp16: bool = False
    with_preprocessing: bool = False
    min_opset: int = MIN_OPSET
    tolerance: float | None = None
    force: bool = False
    server_repo: str | os.PathLike | None = None
    model_name: str | None = None
    tensorrt: bool = False
    max_batch_size: int = 32

    @property
    def serving(self) -> Serving:
        """How the repository's Triton serves the hybrid."""
        return Serving(max_batch_size=self.max_batch_size, tensorrt=self.tensorrt, fp16=self.fp16)


@dataclass(frozen=True)
class HybridParts:
    """What a hybrid is made of: A's features graph and B's classifier (as its files hold it)."""

    source: BackboneSpec
    target: BackboneSpec
    features_path: Path
    head: Head  # B's classifier over its file's outputs (label_offset 0: background rows kept)
    classifier_path: Path | None = None

    @classmethod
    def from_exports(cls, a: ExportedBackbone, b: ExportedBackbone) -> HybridParts:
        """A's ``features.onnx``, B's ``head.safetensors`` and ``classifier.onnx``."""
        return cls(a.spec, b.spec, a.features_path, b.head(), b.classifier_path)


def check_map(amap: AffineMap, a: BackboneSpec, b: BackboneSpec) -> None:
    """The map joins these two networks: its names, its shape and finite entries."""
    if (amap.src, amap.dst) != (a.name, b.name):
        raise AffeqError(f"the map {amap.key} does not join {a.name} and {b.name}",
                         f"pass the map {a.name}->{b.name}")
    if amap.weight.shape != (b.feature_dim, a.feature_dim) or amap.bias.shape != (b.feature_dim,):
        raise AffeqError(f"map {amap.key} is {amap.weight.shape[0]}x{amap.weight.shape[1]}, but "
                         f"{b.name} has {b.feature_dim} and {a.name} has {a.feature_dim} "
                         "features", "fit the maps again with these backbones")
    if not (np.isfinite(amap.weight).all() and np.isfinite(amap.bias).all()):
        raise AffeqError(f"map {amap.key} has NaN/Inf entries", "fit the maps again")


def _check_out(out_path: Path, force: bool, repo_pending: bool = False) -> None:
    if out_path.suffix != ".onnx":
        raise AffeqError(f"output {out_path} does not end in .onnx", "name the output *.onnx")
    if out_path.exists() and not force and not repo_pending:
        raise AffeqError(f"output {out_path} already exists", "pass --force to replace it")


def map_sha256(amap: AffineMap) -> str:
    """SHA-256 of the map's float32 weight and bias (what a hybrid was built from)."""
    h = hashlib.sha256(np.ascontiguousarray(amap.weight, np.float32).tobytes())
    h.update(np.ascontiguousarray(amap.bias, np.float32).tobytes())
    return h.hexdigest()


def _repo_pending(out_path: Path, options: HybridOptions, name: str) -> bool:
    """A run killed between writing the hybrid and its Triton repository left the hybrid alone:
    the same command (no ``--force``) then completes the repository from it."""
    return (not options.force and options.server_repo is not None and out_path.is_file()
            and not (Path(options.server_repo) / name).exists())


def _complete_repo(out_path: Path, amap: AffineMap, options: HybridOptions, name: str,
                   progress: Progress | None) -> Path:
    """Write the missing repository from the existing hybrid if it is this build (same parts,
    map, precision and input; checksum verified); else refuse as for any existing output."""
    meta = read_metadata(out_path, verify=True)["metadata"]
    pre = meta.get("preprocessing") if isinstance(meta.get("preprocessing"), dict) else {}
    same = (meta.get("source"), meta.get("target"), meta.get("map_sha256"), meta.get("fp16"),
            pre.get("in_graph")) == (amap.src, amap.dst, map_sha256(amap), options.fp16,
                                     options.with_preprocessing)
    if not same:
        raise AffeqError(f"output {out_path} already exists", "pass --force to replace it")
    or_silent(progress).step(f"{out_path} is complete; writing its missing Triton repository")
    write_model_repository(options.server_repo, name, out_path, labels=meta.get("labels"),
                           force=False, serving=options.serving)
    return out_path


def build_hybrid(amap: AffineMap, a: ExportedBackbone, b: ExportedBackbone, *,
                 out: str | os.PathLike | None = None, options: HybridOptions = HybridOptions(),
                 extra_meta: Mapping[str, Any] | None = None,
                 verify_images: Sequence[str | os.PathLike] = (),
                 progress: Progress | None = None) -> Path:
    """Compose, verify and write the hybrid ``a → amap → b``'s classifier; return its path.

    ``out`` None: ``<model name>.onnx``. Refuses an existing ``out`` (or repository model folder)
    unless ``options.force``; nothing is written unless verification (on ``verify_images``, else
    scikit-image's photos) passes. ``extra_meta`` joins the file's metadata (``accuracy`` there
    replaces the map's own figure).
    """
    return build_from_parts(HybridParts.from_exports(a, b), amap, out, options,
                            extra_meta=extra_meta, verify_images=verify_images,
                            progress=progress)


def output_path(src: str, dst: str, out: str | os.PathLike | None,
                options: HybridOptions) -> Path:
    """Where the hybrid ``src``→``dst`` goes, refused early (before any fit or export) if it is
    taken (or is no ``.onnx``), or the repository's model folder is, without ``options.force``."""
    name = options.model_name or default_model_name(src, dst, options.fp16)
    out_path = Path(out) if out is not None else Path(f"{name}.onnx")
    _check_out(out_path, options.force, _repo_pending(out_path, options, name))
    if options.server_repo is not None:
        check_repo_target(options.server_repo, name, options.force)
    return out_path


def _metadata(parts: HybridParts, amap: AffineMap, n_classes: int, options: HybridOptions,
              extra_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    stats = dict(amap.stats)
    acc = next((stats[k] for k in ("top1", "accuracy", "val_top1") if k in stats), None)
    b = parts.target
    labels = label_names(b.num_classes, b.label_offset)
    if len(labels) != n_classes:
        labels = [str(i) for i in range(n_classes)]
    return {
        "source": parts.source.name, "target": b.name, "method": amap.method,
        "fit_images": stats.get("images"), "fit_stats": stats,
        "accuracy": acc if acc is not None else "unknown",
        "preprocessing": preprocessing_record(parts.source, options.with_preprocessing),
        "label_offset": b.label_offset, "labels": labels, "fp16": options.fp16,
        "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(extra_meta or {}),
    }


def _compose(parts: HybridParts, amap: AffineMap, out_path: Path, options: HybridOptions,
             say: Any) -> tuple[Any, Head, int]:
    """The hybrid's graph (A's features, then B's head with the map folded in), B's folded head
    and the bytes the file needs, after the checks that come before any work."""
    import onnx

    src, dst = parts.source.name, parts.target.name
    if parts.head.dim != amap.weight.shape[0]:
        raise AffeqError(f"{dst}'s head is {parts.head.weight.shape}, the map {amap.key} gives "
                         f"{amap.weight.shape[0]} features", f"re-export {dst} or refit the map")
    folded = fold_head(amap, parts.head)
    # The file holds A's graph and the folded head (float32: an upper bound for --fp16); checked
    # before composing (the Triton repository checks its own copy).
    need = parts.features_path.stat().st_size + folded.weight.size * 4
    check_free_space(out_path.parent, need, f"the hybrid {out_path}")
    say("composing the graph")
    try:
        features = onnx.load(str(parts.features_path))
    except Exception as e:  # DecodeError and friends
        raise AffeqError(f"{parts.features_path} is not a readable ONNX model "
                         f"({e.__class__.__name__})", f"re-export it: affeq-rt export {src}"
                         ) from None
    model = compose_hybrid(features, folded.weight, folded.bias, parts.source.preprocessing,
                           options.with_preprocessing, options.min_opset)
    return (half_model(model) if options.fp16 else model), folded, need


def _reference(parts: HybridParts, amap: AffineMap, options: HybridOptions,
               verify_images: Sequence[str | os.PathLike]) -> tuple[Any, Any, list[str]]:
    """What the hybrid must reproduce: ``C_B(M·F_A(x))`` from the separate parts, the hybrid's
    input for the same images (uint8 with in-graph preprocessing) and their names."""
    x, x_u8, names = verification_inputs(parts.source, paths=verify_images)
    ref = reference_logits(parts.features_path, amap.weight, amap.bias, parts.head, x,
                           parts.classifier_path)
    return ref, (x_u8 if options.with_preprocessing else x), names


def _write_verified(model: Any, meta: dict[str, Any], out_path: Path, options: HybridOptions,
                    reference: tuple[Any, Any, list[str]], need: int, say: Any) -> None:
    """Write ``model`` to ``out_path`` atomically (``need`` bytes), only if it matches the
    ``reference`` (:func:`_reference`) within the tolerance."""
    ref, feed, names = reference
    data_name = f"{out_path.name}.data" if too_big_for_memory(model) else None
    with atomic_path(out_path, need=need) as tmp:
        try:
            set_metadata(model, meta)
            save_model(model, tmp, data_name)
            ver = verify(tmp, ref, feed, names, options.fp16, options.tolerance)
            say(f"max relative error {ver.max_rel:.3g} (tolerance {ver.tolerance:g}); top-1 agrees "
                f"on {ver.top1_agree}/{ver.top1_checked} clear-margin images")
            if not ver.passed:
                raise AffeqError(
                    f"hybrid {meta['source']}->{meta['target']} fails verification: max relative "
                    f"error {ver.max_rel:.3g} (tolerance {ver.tolerance:g}), top-1 agrees on "
                    f"{ver.top1_agree}/{ver.top1_checked} images",
                    "report this as a bug with the maps file")
            meta["verification"] = ver.to_dict()
            set_metadata(model, meta)
            save_model(model, tmp, data_name)
            stamp_checksum(tmp)  # readers check it (sizes always, hashes with --verify)
        except BaseException:
            if data_name is not None:
                (out_path.parent / data_name).unlink(missing_ok=True)
            raise


def build_from_parts(parts: HybridParts, amap: AffineMap, out: str | os.PathLike | None,
                     options: HybridOptions = HybridOptions(), *,
                     extra_meta: Mapping[str, Any] | None = None,
                     verify_images: Sequence[str | os.PathLike] = (),
                     progress: Progress | None = None) -> Path:
    """:func:`build_hybrid` from its parts as arrays and paths (what it is given by tests and
    benchmarks that make their own graphs)."""
    say = or_silent(progress).step
    src, dst = parts.source.name, parts.target.name
    name = options.model_name or default_model_name(src, dst, options.fp16)
    out_path = output_path(src, dst, out, options)
    check_map(amap, parts.source, parts.target)
    if _repo_pending(out_path, options, name):
        return _complete_repo(out_path, amap, replace(options, model_name=name), name, progress)
    model, folded, need = _compose(parts, amap, out_path, options, say)
    meta = _metadata(parts, amap, folded.weight.shape[0], options, extra_meta)
    meta["map_sha256"] = map_sha256(amap)
    say("verifying against the separate parts")
    reference = _reference(parts, amap, options, verify_images)
    _write_verified(model, meta, out_path, options, reference, need, say)
    if options.server_repo is not None:
        say(f"writing the Triton model repository {options.server_repo}")
        write_model_repository(options.server_repo, name, out_path, labels=meta["labels"],
                               force=options.force, serving=options.serving)
    return out_path
