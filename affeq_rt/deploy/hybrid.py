"""Hybrid models for deployment: A's feature graph + B's classifier with the affine map folded in.

``build_hybrid(src, dst, maps=… | fit_on=…, out=…, options=HybridOptions(…))`` writes ONE ONNX file
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
from affeq_rt.deploy.triton import check_repo_target, write_model_repository
from affeq_rt.deploy.verify import first_images, reference_logits, verification_inputs, verify
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path, check_free_space
from affeq_rt.io.maps import AffineMap, MapSet, fold_head, load_maps
from affeq_rt.method.extract import ImageOptions
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import half_model
from affeq_rt.progress import Progress, or_silent
from affeq_rt.registry.spec import BackboneSpec, get_spec


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


@dataclass(frozen=True)
class HybridParts:
    """What a hybrid is made of: A's features graph and B's classifier (as its files hold it)."""

    source: BackboneSpec
    target: BackboneSpec
    features_path: Path
    head: tuple[np.ndarray, np.ndarray]  # B's (W [K, d_B], c [K]), background rows kept
    classifier_path: Path | None = None

    @classmethod
    def from_exports(cls, a: ExportedBackbone, b: ExportedBackbone) -> HybridParts:
        """A's ``features.onnx``, B's ``head.safetensors`` and ``classifier.onnx``."""
        return cls(a.spec, b.spec, a.features_path, b.head(), b.classifier_path)


def _resolve_map(maps: MapSet | str | os.PathLike, src: str, dst: str, d_src: int,
                 d_dst: int) -> AffineMap:
    ms = maps if isinstance(maps, MapSet) else load_maps(maps)
    m = ms[(src, dst)]
    if m.weight.shape != (d_dst, d_src) or m.bias.shape != (d_dst,):
        raise AffeqError(f"map {src}->{dst} in {ms.path or 'maps'} is {m.weight.shape[0]}x"
                         f"{m.weight.shape[1]}, but {dst} has {d_dst} and {src} has {d_src} "
                         "features",
                         "fit the maps again with these backbones")
    if not (np.isfinite(m.weight).all() and np.isfinite(m.bias).all()):
        raise AffeqError(f"map {src}->{dst} has NaN/Inf entries", "fit the maps again")
    return m


def _fit_map(src: str, dst: str, fit_on: str | os.PathLike, method: str,
             export_root: str | os.PathLike | None, random_weights: bool,
             holdout: float) -> MapSet:
    """Fit the map src→dst on the images of ``fit_on`` (one joint pass, ``method.fit.fit``)."""
    folder = Path(fit_on)
    if not folder.is_dir():
        raise AffeqError(f"--fit-on {folder} is not a folder", "pass a folder of images")
    maps = fit(str(folder), [src, dst], method, options=FitOptions(holdout=holdout),
               images=ImageOptions(random_weights=random_weights, export_root=export_root)).maps
    return MapSet(maps.values(), {"fit_on": str(folder)}, f"(fitted on {folder})")


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
                           force=False, max_batch_size=options.max_batch_size,
                           tensorrt=options.tensorrt, fp16=options.fp16)
    return out_path


def build_hybrid(src: str, dst: str, *, maps: MapSet | str | os.PathLike | None = None,
                 fit_on: str | os.PathLike | None = None, method: str = "auto",
                 holdout: float = 0.1, out: str | os.PathLike | None = None,
                 options: HybridOptions = HybridOptions(),
                 export_root: str | os.PathLike | None = None, random_weights: bool = False,
                 accuracy: Any = None, progress: Progress | None = None) -> Path:
    """Build, verify and write the hybrid ONNX model ``src → map → dst``; return its path.

    ``maps`` is a maps file (or ``maps.MapSet``) holding ``src->dst``; alternatively ``fit_on`` is
    an image folder the map is fitted on with ``method`` (``holdout`` of the images held out;
    ridge picks λ on them). Refuses an existing ``out`` (or repository model folder) unless
    ``options.force``; nothing is written unless verification passes.
    """
    say = or_silent(progress).step
    if (maps is None) == (fit_on is None):
        raise AffeqError("give exactly one of --maps FILE and --fit-on DIR",
                         "pass a maps file from affeq-rt fit, or an image folder to fit on")
    s_spec, d_spec = get_spec(src), get_spec(dst)
    src, dst = s_spec.name, d_spec.name
    name = options.model_name or default_model_name(src, dst, options.fp16)
    out_path = Path(out) if out is not None else Path(f"{name}.onnx")
    pending = _repo_pending(out_path, options, name)
    _check_out(out_path, options.force, pending)
    if options.server_repo is not None:
        check_repo_target(options.server_repo, name, options.force)

    # The map: from a file (checked against both feature widths) or fitted now.
    if maps is None:
        say(f"fitting {src}->{dst} on {fit_on} ({method})")
        maps_in: MapSet | str | os.PathLike = _fit_map(src, dst, fit_on, method, export_root,
                                                       random_weights, holdout)
    else:
        maps_in = maps
    amap = _resolve_map(maps_in, src, dst, s_spec.feature_dim, d_spec.feature_dim)
    if pending:
        return _complete_repo(out_path, amap, replace(options, model_name=name), name, progress)

    say(f"exporting {src} and {dst}")
    a_exp = ExportedBackbone(ensure_exported(src, root=export_root, random_weights=random_weights))
    b_exp = ExportedBackbone(ensure_exported(dst, root=export_root, random_weights=random_weights))
    extra = {"maps_file": None if maps is None else str(getattr(maps, "path", maps)),
             "fit_on": None if fit_on is None else str(fit_on), "random_weights": random_weights}
    return build_from_parts(HybridParts.from_exports(a_exp, b_exp), amap, out_path,
                            replace(options, model_name=name), accuracy=accuracy, extra_meta=extra,
                            verify_images=first_images(fit_on), progress=progress)


def _metadata(parts: HybridParts, amap: AffineMap, n_classes: int, options: HybridOptions,
              accuracy: Any, extra_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    stats = dict(amap.stats)
    acc = accuracy if accuracy is not None else next(
        (stats[k] for k in ("top1", "accuracy", "val_top1") if k in stats), None)
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


def build_from_parts(parts: HybridParts, amap: AffineMap, out: str | os.PathLike,
                     options: HybridOptions = HybridOptions(), *, accuracy: Any = None,
                     extra_meta: Mapping[str, Any] | None = None,
                     verify_images: Sequence[str | os.PathLike] = (),
                     progress: Progress | None = None) -> Path:
    """The part of :func:`build_hybrid` after names are resolved: ``parts`` and the map ``amap``
    → verified hybrid at ``out``."""
    import onnx

    say = or_silent(progress).step
    out_path = Path(out)
    a_spec, b_spec = parts.source, parts.target
    src, dst = a_spec.name, b_spec.name
    name = options.model_name or default_model_name(src, dst, options.fp16)
    pending = _repo_pending(out_path, options, name)
    _check_out(out_path, options.force, pending)
    if options.server_repo is not None:
        check_repo_target(options.server_repo, name, options.force)
    if pending:
        return _complete_repo(out_path, amap, options, name, progress)
    w_b, c_b = (np.asarray(a) for a in parts.head)
    if w_b.ndim != 2 or w_b.shape[1] != amap.weight.shape[0] or c_b.shape != (w_b.shape[0],):
        raise AffeqError(f"{dst}'s head is {w_b.shape}, the map {amap.key} gives "
                         f"{amap.weight.shape[0]} features", f"re-export {dst} or refit the map")
    w_fold, b_fold = fold_head(amap, w_b, c_b)
    # The file holds A's graph and the folded head (float32: an upper bound for --fp16); checked
    # before composing (the Triton repository checks its own copy).
    need = parts.features_path.stat().st_size + w_fold.size * 4
    check_free_space(out_path.parent, need, f"the hybrid {out_path}")

    say("composing the graph")
    try:
        features = onnx.load(str(parts.features_path))
    except Exception as e:  # DecodeError and friends
        raise AffeqError(f"{parts.features_path} is not a readable ONNX model "
                         f"({e.__class__.__name__})", f"re-export it: affeq-rt export {src}"
                         ) from None
    model = compose_hybrid(features, w_fold, b_fold, a_spec.preprocessing,
                           options.with_preprocessing, options.min_opset)
    if options.fp16:
        model = half_model(model)
    meta = _metadata(parts, amap, w_fold.shape[0], options, accuracy, extra_meta)
    meta["map_sha256"] = map_sha256(amap)

    say("verifying against the separate parts")
    x, x_u8, names = verification_inputs(a_spec, paths=verify_images)
    ref = reference_logits(parts.features_path, amap.weight, amap.bias, (w_b, c_b), x,
                           parts.classifier_path)
    feed = x_u8 if options.with_preprocessing else x
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
                    f"hybrid {src}->{dst} fails verification: max relative error {ver.max_rel:.3g}"
                    f" (tolerance {ver.tolerance:g}), top-1 agrees on {ver.top1_agree}/"
                    f"{ver.top1_checked} images", "report this as a bug with the maps file")
            meta["verification"] = ver.to_dict()
            set_metadata(model, meta)
            save_model(model, tmp, data_name)
            stamp_checksum(tmp)  # readers check it (sizes always, hashes with --verify)
        except BaseException:
            if data_name is not None:
                (out_path.parent / data_name).unlink(missing_ok=True)
            raise
    if options.server_repo is not None:
        say(f"writing the Triton model repository {options.server_repo}")
        write_model_repository(options.server_repo, name, out_path, labels=meta["labels"],
                               force=options.force, max_batch_size=options.max_batch_size,
                               tensorrt=options.tensorrt, fp16=options.fp16)
    return out_path
