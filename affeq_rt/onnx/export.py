"""Split ONNX export: any backbone becomes features.onnx (image → pooled vector) + classifier.onnx.

Every export is checked (``onnx.checker`` full check, and onnxruntime's
classifier(features(x)) against the framework's logits on real photos and noise) and written
into a temporary folder that replaces the export folder only when everything passed. Reading an
export folder is :mod:`affeq_rt.onnx.exported`.
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from affeq_rt.data.preprocess import preprocess, sample_photo
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import (
    atomic_dir,
    check_free_space,
    ensure_writable_dir,
    sha256_file,
    versions,
    write_json_atomic,
)
from affeq_rt.io.heads import save_head
from affeq_rt.model.build import build_with_info
from affeq_rt.model.split import check_split, split_error, split_model
from affeq_rt.onnx.exported import ExportedBackbone, default_export_root
from affeq_rt.onnx.runtime import create_session
from affeq_rt.progress import Progress, or_silent
from affeq_rt.registry.spec import BackboneSpec, get_spec

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping

    import torch

OPSET = 17
# Relative export error = max|ORT − torch| / max|torch| over the check inputs' logits. Measured
# ~1e-6 on every registry network (fp32 kernels summing in a different order through 20–500
# layers); 1e-3 leaves a wide margin for other CPUs/providers yet any real fault (wrong split,
# training-mode batch norm, a dropped layer) is off by 1e-1 or more.
EXPORT_RTOL = 1e-3
CHECK_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


# ---------------------------------------------------------------------------------------------
# check inputs


def check_inputs(spec: BackboneSpec, n_noise: int = 2,
                 seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Real photos (scikit-image's, if installed) preprocessed for ``spec``, plus Gaussian noise."""
    xs, names = [], []
    try:
        for name in CHECK_PHOTOS:
            xs.append(preprocess(sample_photo(name), spec))
            names.append(f"skimage:{name}")
    except ImportError:
        pass  # noise only; the manifest says which inputs were used
    size = spec.input_size
    rng = np.random.default_rng(seed)
    for i in range(n_noise):
        xs.append(rng.standard_normal((3, size, size)).astype(np.float32))
        names.append(f"noise:{i}")
    return np.stack(xs).astype(np.float32), names


# ---------------------------------------------------------------------------------------------
# export


def _onnx_export(module: torch.nn.Module, example: torch.Tensor, path: Path, in_name: str,
                 out_name: str, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): 4-10x faster than the dynamo exporter on these
    CNNs (NASNet-Large 48 s vs 2+ min on 2 cores) and exact (≤1e-6); dynamic batch axis."""
    import torch

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[in_name],
                          output_names=[out_name], opset_version=opset,
                          dynamic_axes={in_name: {0: "N"}, out_name: {0: "N"}},
                          do_constant_folding=True, dynamo=False)
    module.eval()  # the exporter restores the module's previous mode; keep eval regardless


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
        raise AffeqError(f"exported {path.name} fails onnx.checker ({first})",
                         "report this model; the export was not written") from None


def _check_shapes(spec: BackboneSpec, d: int, k: int, out_shape: tuple[int, ...]) -> None:
    """The model's feature width, class count and logits shape must match the spec."""
    if spec.feature_dim != d:
        raise AffeqError(f"{spec.name}: the model gives {d} features, the spec says "
                         f"{spec.feature_dim}", "fix feature_dim in the spec")
    if spec.num_classes != k:
        raise AffeqError(f"{spec.name}: the head has {k} outputs, the spec says "
                         f"{spec.num_classes}", "fix num_classes in the spec")
    if len(out_shape) != 2 or out_shape[1] != k:
        raise AffeqError(f"{spec.name}: model output {out_shape} is not (N, {k})",
                         "the classifier must be the model's last layer")


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got − ref| / max|ref| (a zero reference counts as scale 1e-12)."""
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def _compare(tmp: Path, x: np.ndarray, ref: dict[str, Any], spec: BackboneSpec,
             model_name: str, tolerance: float) -> tuple[float, float]:
    """onnxruntime's logits and features from the written graphs against torch's (``ref``:
    logits, features, split logits, split error); AffeqError beyond ``tolerance``."""
    fs = create_session(tmp / "features.onnx", provider="cpu")
    cs = create_session(tmp / "classifier.onnx", provider="cpu")
    got_feats = fs.run(x, batch_size=len(x))
    got = cs.run(got_feats, batch_size=len(x)).astype(np.float64)
    max_rel = _rel(got, ref["logits"].double().numpy())
    # Features too: a head that random init leaves at zero (MLP-Mixer, torchvision ViT)
    # gives constant logits, which would make the logit check vacuous.
    feat_rel = _rel(got_feats.astype(np.float64), ref["features"].double().numpy())
    split_rel = ref["split_rel"]
    bad_split = not split_rel <= tolerance
    for what, err in (("logits", max_rel), ("features", feat_rel)):
        if not np.isfinite(err) or err > tolerance:
            why = (f" because {model_name} is not its classifier applied to its pre-logits (in "
                   f"torch too: {split_rel:.3g}), so it cannot be split exactly"
                   if bad_split else "")
            raise AffeqError(f"{spec.name}: ONNX {what} differ from torch by {err:.3g} "
                             f"(relative, tolerance {tolerance:g}){why}",
                             "pick another model; the export was not written" if bad_split
                             else "the export was not written; report it")
    check_split(model_name, ref["logits"], ref["split_logits"], tolerance)
    return max_rel, feat_rel


def _torch_reference(model: Any, features: Any, head: Any, spec: BackboneSpec,
                     xt: Any) -> dict[str, Any]:
    """The framework's own logits (the reference of every check), features, and the split's
    logits ``head(features(x))`` with their error; the shapes checked against ``spec``."""
    import torch

    with torch.no_grad():
        logits = model(xt)
        feats = features(xt)
        _check_shapes(spec, int(feats.shape[1]), int(head.out_features), tuple(logits.shape))
        split_logits = head(feats)
    return {"logits": logits, "features": feats, "split_logits": split_logits,
            "split_rel": split_error(logits, split_logits)}  # the family's split rule holds?


def export_split(model: torch.nn.Module, spec: BackboneSpec, out_dir: str | os.PathLike, *,
                 weights_info: Mapping[str, Any] | None = None,
                 inputs: tuple[np.ndarray, list[str]] | None = None, tolerance: float = EXPORT_RTOL,
                 opset: int = OPSET, progress: Progress | None = None) -> Path:
    """Export any features→linear-head torch model into the export folder ``out_dir``.

    ``inputs`` (array [n,3,S,S], names) overrides the check images. Raises AffeqError, with
    ``out_dir`` untouched, if the graphs fail the checker or exceed ``tolerance``.
    """
    import torch

    say = or_silent(progress).step
    out = Path(out_dir)
    ensure_writable_dir(out.parent)
    model = model.eval()
    features, head = split_model(model)
    # What the folder will hold: the weights once in features.onnx + classifier.onnx, the head
    # again in head.safetensors (float32); checked before anything is run or exported.
    need = 4 * (sum(int(p.numel()) for p in model.parameters())
                + sum(int(p.numel()) for p in head.parameters()))
    check_free_space(out.parent, need, f"the export {out}")
    x, names = inputs if inputs is not None else check_inputs(spec)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ref = _torch_reference(model, features, head, spec, xt)
    d, k = int(ref["features"].shape[1]), int(head.out_features)
    with atomic_dir(out, need=need) as tmp:
        say("exporting features.onnx")
        _onnx_export(features, xt[:2], tmp / "features.onnx", "image", "features", opset)
        say("exporting classifier.onnx")
        _onnx_export(head, ref["features"][:2], tmp / "classifier.onnx", "features", "logits",
                     opset)
        w = head.weight.detach().float().numpy()
        b = (head.bias.detach().float().numpy() if head.bias is not None
             else np.zeros(k, np.float32))
        save_head(tmp / "head.safetensors", w, b)
        say("checking graphs")
        for f in ("features.onnx", "classifier.onnx"):
            _check_onnx(tmp / f)
        say(f"comparing onnxruntime with torch on {len(names)} inputs")
        max_rel, feat_rel = _compare(tmp, x, ref, spec, type(model).__name__, tolerance)
        manifest = {
            "spec": spec.to_dict(),
            "weights": dict(weights_info or {"source": "unknown"}),
            "versions": versions(),
            "opset": opset,
            "exporter": "torch.onnx (TorchScript, dynamo=False)",
            "feature_dim": d,
            "num_classes": k,
            "checksums": {f: sha256_file(tmp / f) for f in sorted(os.listdir(tmp))
                          if (tmp / f).is_file() and not f.startswith(".")},
            "export_error": {"max_rel": max_rel, "features_max_rel": feat_rel,
                             "split_max_rel": ref["split_rel"], "tolerance": tolerance,
                             "inputs": names,
                             "measure": "max|ort - torch| / max|torch| over logits"},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return out


def export_backbone(name: str, out: str | os.PathLike | None = None,
                    weights: str | os.PathLike | None = None, random_weights: bool = False,
                    progress: Progress | None = None) -> ExportedBackbone:
    """Export backbone ``name`` to ``<out>/<canonical name>/`` (``out`` None: default root)."""
    spec = get_spec(name)
    return ExportedBackbone(_export(spec, _root(out), weights, random_weights, progress))


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else default_export_root()


def _export(spec: BackboneSpec, root: Path, weights: str | os.PathLike | None,
            random_weights: bool, progress: Progress | None) -> Path:
    ensure_writable_dir(root)
    or_silent(progress).step(f"building {spec.name}")
    model, info = build_with_info(spec, weights, random_weights)
    return export_split(model, spec, root / spec.name, weights_info=info, progress=progress)


def _reusable(folder: Path, spec: BackboneSpec, weights: str | os.PathLike | None,
              random_weights: bool) -> ExportedBackbone | None:
    """The export in ``folder`` if it is intact (checksums) and of the same spec and the requested
    kind of weights: random ↔ random, a file ↔ same bytes, default ↔ any real weights (so an
    export made with ``--weights FILE`` is reused later); else None (missing, stale, damaged)."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        exp = ExportedBackbone(folder)
        exp.verify()
    except AffeqError:
        return None
    got = exp.manifest.get("weights") or {}
    if exp.manifest.get("spec") != spec.to_dict():
        return None
    if random_weights:
        same = got.get("source") == "random"
    elif weights is not None:
        p = Path(weights).expanduser()
        same = p.is_file() and got.get("sha256") == sha256_file(p)
    else:
        same = got.get("source") not in (None, "random", "unknown")
    return exp if same else None


def ensure_exported(name: str | BackboneSpec, root: str | os.PathLike | None = None,
                    weights: str | os.PathLike | None = None, random_weights: bool = False,
                    progress: Progress | None = None) -> ExportedBackbone:
    """A valid export of ``name`` (a registry name, or its resolved spec) with the same spec,
    the requested weights and checksums intact, in ``<root>/<canonical name>``, exported there
    first if there is none."""
    spec = name if isinstance(name, BackboneSpec) else get_spec(name)
    base = _root(root)
    found = _reusable(base / spec.name, spec, weights, random_weights)
    if found is not None:
        return found
    return ExportedBackbone(_export(spec, base, weights, random_weights, progress))
