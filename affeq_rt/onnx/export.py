"""Split ONNX export: any backbone becomes features.onnx (image → pooled vector) + classifier.onnx.

Every export is checked (``onnx.checker`` full check, and onnxruntime's
classifier(features(x)) against the framework's logits on real photos and noise) and written
into a temporary folder that replaces the export folder only when everything passed.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import (
    atomic_dir,
    ensure_writable_dir,
    read_json,
    sha256_file,
    versions,
)
from affeq_rt.io.heads import load_head, save_head
from affeq_rt.registry.spec import BackboneSpec, get_spec, spec_from

if TYPE_CHECKING:  # pragma: no cover
    import torch

FILES = ("features.onnx", "classifier.onnx", "head.safetensors")
OPSET = 17
# Relative export error = max|ORT − torch| / max|torch| over the check inputs' logits. Measured
# ~1e-6 on every registry network (fp32 kernels summing in a different order through 20–500
# layers); 1e-3 leaves a wide margin for other CPUs/providers yet any real fault (wrong split,
# training-mode batch norm, a dropped layer) is off by 1e-1 or more.
EXPORT_RTOL = 1e-3
CHECK_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
ProgressFn = Callable[[str], None]


def default_export_root() -> Path:
    """``$AFFEQ_RT_HOME/exports`` (default ``~/.cache/affeq-rt/exports``)."""
    home = os.environ.get("AFFEQ_RT_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "affeq-rt") / "exports"


# ---------------------------------------------------------------------------------------------
# weights and model building


def _default_source(spec: BackboneSpec) -> tuple[Path, str]:
    """The spec's own weights file and a stable description of it, or AffeqError."""
    from affeq_rt.model.weights import hub_file, package_file

    w = spec.weights
    if w.kind == "package":
        return package_file(str(w.package), str(w.file)), f"package:{w.package}/{w.file}"
    if w.kind == "file":
        p = Path(str(w.file)).expanduser()
        if not p.is_file():
            raise AffeqError(f"{spec.name}'s weights file {p} does not exist",
                             "pass --weights FILE or --random-weights")
        return p, f"file:{p}"
    if w.kind == "hub":
        p = hub_file(str(w.hub))
        if p is None:
            raise AffeqError(f"no local weights for {spec.name}: {w.hub} is not in the local "
                             "hub cache (downloads are off)",
                             "set AFFEQ_RT_DOWNLOAD=1 to fetch it, or pass --weights FILE "
                             "(a state dict for this architecture) or --random-weights")
        return p, f"hub:{w.hub}"
    raise AffeqError(f"{spec.name} has no registered weights",
                     "pass --weights FILE or --random-weights")


def weights_request(spec: BackboneSpec, weights: str | os.PathLike | None,
                    random_weights: bool) -> dict[str, Any]:
    """Describe which weights an export would use (no loading): ``source``, ``path``."""
    if random_weights and weights is not None:
        raise AffeqError("both --weights and --random-weights given", "pass only one")
    if random_weights:
        return {"source": "random", "path": None, "seed": 0}
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise AffeqError(f"weights file {p} does not exist", "check the --weights path")
        return {"source": f"file:{p.resolve()}", "path": str(p)}
    path, source = _default_source(spec)
    return {"source": source, "path": str(path)}


def _build_arch(spec: BackboneSpec, random_init: bool) -> torch.nn.Module:
    """The bare architecture (random init), eval mode."""
    if spec.library == "timm":
        import timm

        try:
            model = timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes)
        except RuntimeError as e:  # unknown model
            raise AffeqError(f"timm has no architecture {spec.arch!r} ({e})",
                             "fix the spec's arch") from None
    elif spec.library == "torchvision":
        import torchvision.models as tvm

        kwargs: dict[str, Any] = {"weights": None, "num_classes": spec.num_classes}
        if spec.arch == "googlenet":  # as torchvision builds it for its ported TF weights
            kwargs.update(aux_logits=False, transform_input=True, init_weights=random_init)
        try:
            model = tvm.get_model(spec.arch, **kwargs)
        except ValueError as e:
            raise AffeqError(f"torchvision has no architecture {spec.arch!r} ({e})",
                             "fix the spec's arch") from None
    else:
        raise AffeqError(f"{spec.name}: {spec.library!r} models are built by their own code",
                         "call export.export_split with the trained module")
    return model.eval()


def _build(spec: BackboneSpec, weights: str | os.PathLike | None,
           random_weights: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    import torch

    from affeq_rt.model.weights import adapt, load_state_dict, load_strict

    info = weights_request(spec, weights, random_weights)
    if random_weights:
        torch.manual_seed(int(info["seed"]))
    model = _build_arch(spec, random_init=random_weights)
    if not random_weights:
        path = Path(info["path"])
        state = load_state_dict(path)
        adapter = spec.weights.adapter
        load_strict(model, adapt(state, model, adapter), str(path))
        info.update(sha256=sha256_file(path), adapter=adapter)
    return model.eval(), info


def build_model(spec: BackboneSpec | Mapping[str, Any] | str,
                weights: str | os.PathLike | None = None,
                random_weights: bool = False) -> torch.nn.Module:
    """A registry backbone in eval mode with its weights (the spec's, a file, or random)."""
    model, _ = _build(spec_from(spec), weights, random_weights)
    return model


# ---------------------------------------------------------------------------------------------
# splitting a model into features → linear head


def _as_linear(head: Any, where: str) -> torch.nn.Linear:
    import torch

    if isinstance(head, torch.nn.Linear):
        return head
    if isinstance(head, torch.nn.Conv2d) and tuple(head.kernel_size) == (1, 1) and head.groups == 1:
        lin = torch.nn.Linear(head.in_channels, head.out_channels, bias=head.bias is not None,
                              device=head.weight.device)
        if head.weight.is_meta:  # shapes only (registry checks)
            return lin
        with torch.no_grad():
            lin.weight.copy_(head.weight.flatten(1))
            if head.bias is not None:
                lin.bias.copy_(head.bias)
        return lin.eval()
    raise AffeqError(f"{where} is {type(head).__name__}, not a linear classifier",
                     "give the model a Linear (or 1x1 conv) classifier")


def split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(features module: image → [N, d], linear head) for timm-style or torchvision models.

    timm-style: ``forward_head(forward_features(x), pre_logits=True)`` and ``get_classifier()``
    (the demo's own nets follow this protocol). torchvision: the last Linear (``fc``, or the end of
    ``classifier``) is the head; everything before it, ReLU/Dropout of fc7 included, is features.
    """
    import torch

    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        head = _as_linear(model.get_classifier(), "get_classifier()")

        class _TimmFeatures(torch.nn.Module):
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.m.forward_head(self.m.forward_features(x), pre_logits=True).flatten(1)

        return _TimmFeatures(model).eval(), head
    feats = copy.deepcopy(model)
    if isinstance(getattr(feats, "fc", None), torch.nn.Linear):
        head = model.fc
        feats.fc = torch.nn.Identity()
    elif isinstance(getattr(feats, "classifier", None), torch.nn.Linear):
        head = model.classifier
        feats.classifier = torch.nn.Identity()
    elif isinstance(getattr(feats, "classifier", None), torch.nn.Sequential) \
            and isinstance(feats.classifier[-1], torch.nn.Linear):
        head = model.classifier[-1]
        feats.classifier[-1] = torch.nn.Identity()
    else:
        raise AffeqError(f"cannot find the classifier of {type(model).__name__}",
                         "expose forward_features/forward_head/get_classifier, "
                         "or a Linear fc/classifier")

    class _Flat(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).flatten(1)

    return _Flat(feats).eval(), head


# ---------------------------------------------------------------------------------------------
# check inputs


def check_inputs(spec: Mapping[str, Any] | BackboneSpec, n_noise: int = 2,
                 seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Real photos (scikit-image's, if installed) preprocessed for ``spec``, plus Gaussian noise."""
    from affeq_rt.data.preprocess import preprocess, sample_photo

    s = spec.to_dict() if isinstance(spec, BackboneSpec) else dict(spec)
    xs, names = [], []
    try:
        for name in CHECK_PHOTOS:
            xs.append(preprocess(sample_photo(name), s))
            names.append(f"skimage:{name}")
    except ImportError:
        pass  # noise only; the manifest says which inputs were used
    size = int(s["input_size"])
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


def _say(progress: ProgressFn | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def export_split(model: torch.nn.Module, spec_dict: Mapping[str, Any] | BackboneSpec,
                 out_dir: str | os.PathLike, *, weights_info: Mapping[str, Any] | None = None,
                 inputs: tuple[np.ndarray, list[str]] | None = None, tolerance: float = EXPORT_RTOL,
                 opset: int = OPSET, progress: ProgressFn | None = None) -> Path:
    """Export any features→linear-head torch model into the export folder ``out_dir``.

    ``spec_dict`` is the registry JSON form (input_size, mean/std, … feature_dim, num_classes);
    ``inputs`` (array [n,3,S,S], names) overrides the check images. Raises AffeqError, with
    ``out_dir`` untouched, if the graphs fail the checker or exceed ``tolerance``.
    """
    import torch

    from affeq_rt.onnx.runtime import create_session

    spec = dict(spec_dict.to_dict() if isinstance(spec_dict, BackboneSpec) else spec_dict)
    out = Path(out_dir)
    ensure_writable_dir(out.parent)
    model = model.eval()
    features, head = split_model(model)
    x, names = inputs if inputs is not None else check_inputs(spec)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        ref_logits = model(xt[:2]).float()
        feats = features(xt[:2])
        d, k = int(feats.shape[1]), int(head.out_features)
    if spec.get("feature_dim") is not None and int(spec["feature_dim"]) != d:
        raise AffeqError(f"{spec.get('name')}: the model gives {d} features, the spec says "
                         f"{spec['feature_dim']}", "fix feature_dim in the spec")
    if spec.get("num_classes") is not None and int(spec["num_classes"]) != k:
        raise AffeqError(f"{spec.get('name')}: the head has {k} outputs, the spec says "
                         f"{spec['num_classes']}", "fix num_classes in the spec")
    if tuple(ref_logits.shape) != (2, k):
        raise AffeqError(f"{spec.get('name')}: model output {tuple(ref_logits.shape)} "
                         f"is not (N, {k})",
                         "the classifier must be the model's last layer")
    with atomic_dir(out) as tmp:
        _say(progress, "exporting features.onnx")
        _onnx_export(features, xt[:2], tmp / "features.onnx", "image", "features", opset)
        _say(progress, "exporting classifier.onnx")
        _onnx_export(head, feats, tmp / "classifier.onnx", "features", "logits", opset)
        w = head.weight.detach().float().numpy()
        b = (head.bias.detach().float().numpy() if head.bias is not None
             else np.zeros(k, np.float32))
        save_head(tmp / "head.safetensors", w, b)
        _say(progress, "checking graphs")
        for f in ("features.onnx", "classifier.onnx"):
            _check_onnx(tmp / f)
        _say(progress, f"comparing onnxruntime with torch on {len(names)} inputs")
        with torch.no_grad():
            ref = model(xt).double().numpy()
        fs = create_session(tmp / "features.onnx", provider="cpu")
        cs = create_session(tmp / "classifier.onnx", provider="cpu")
        got = cs.run(fs.run(x, batch_size=len(x)), batch_size=len(x)).astype(np.float64)
        scale = max(float(np.abs(ref).max()), 1e-12)
        max_rel = float(np.abs(got - ref).max() / scale)
        if not np.isfinite(max_rel) or max_rel > tolerance:
            raise AffeqError(f"{spec.get('name')}: ONNX logits differ from torch by {max_rel:.3g} "
                             f"(relative, tolerance {tolerance:g})",
                             "the export was not written; report it")
        del fs, cs
        manifest = {
            "spec": spec,
            "weights": dict(weights_info or {"source": "unknown"}),
            "versions": versions(),
            "opset": opset,
            "exporter": "torch.onnx (TorchScript, dynamo=False)",
            "feature_dim": d,
            "num_classes": k,
            "checksums": {f: sha256_file(tmp / f) for f in sorted(os.listdir(tmp))
                          if (tmp / f).is_file() and not f.startswith(".")},
            "export_error": {"max_rel": max_rel, "tolerance": tolerance, "inputs": names,
                             "measure": "max|ort - torch| / max|torch| over logits"},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        from affeq_rt.io.fsio import write_json_atomic

        write_json_atomic(tmp / "manifest.json", manifest)
    return out


def export_backbone(name: str, out: str | os.PathLike | None = None,
                    weights: str | os.PathLike | None = None, random_weights: bool = False,
                    progress: ProgressFn | None = None) -> Path:
    """Export backbone ``name`` to ``<out>/<canonical name>/`` (``out`` None: default root)."""
    spec = get_spec(name)
    root = Path(out) if out is not None else default_export_root()
    ensure_writable_dir(root)
    _say(progress, f"building {spec.name}")
    model, info = _build(spec, weights, random_weights)
    return export_split(model, spec, root / spec.name, weights_info=info, progress=progress)


def _reusable(exp: ExportedBackbone, spec: BackboneSpec, weights: str | os.PathLike | None,
              random_weights: bool) -> bool:
    """Same spec and the requested kind of weights: random ↔ random, a file ↔ same bytes,
    default ↔ any real weights (so an export made with ``--weights FILE`` is reused later)."""
    if exp.manifest.get("spec") != spec.to_dict():
        return False
    got = exp.manifest.get("weights") or {}
    if random_weights:
        return got.get("source") == "random"
    if weights is not None:
        p = Path(weights).expanduser()
        return p.is_file() and got.get("sha256") == sha256_file(p)
    return got.get("source") not in (None, "random", "unknown")


def ensure_exported(name: str, root: str | os.PathLike | None = None,
                    weights: str | os.PathLike | None = None, random_weights: bool = False,
                    progress: ProgressFn | None = None) -> Path:
    """Folder of a valid export of ``name`` (same spec, requested weights, checksums intact),
    exporting it into ``<root>/<canonical name>`` first if there is none."""
    spec = get_spec(name)
    base = Path(root) if root is not None else default_export_root()
    folder = base / spec.name
    if (folder / "manifest.json").is_file():
        try:
            exp = ExportedBackbone(folder)
            exp.verify()
            if _reusable(exp, spec, weights, random_weights):
                return folder
        except AffeqError:
            pass  # stale or damaged: export again
    return export_backbone(spec.name, base, weights=weights, random_weights=random_weights,
                           progress=progress)


# ---------------------------------------------------------------------------------------------
# reading an export


class ExportedBackbone:
    """An export folder: spec, graph paths, head arrays, manifest; ``verify()`` checks checksums."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise AffeqError(f"{self.path} is not an export folder (no manifest.json)",
                             "run affeq-rt export NAME first")
        self.manifest: dict[str, Any] = read_json(self.path / "manifest.json", "export manifest")
        if not isinstance(self.manifest, dict) or "spec" not in self.manifest:
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

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier as float32 arrays (W [K,d], b [K])."""
        return load_head(self.head_path)

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
        from affeq_rt.onnx.runtime import create_session

        fs = create_session(self.features_path, provider=provider, fp16=fp16)
        cs = create_session(self.classifier_path, provider=provider, fp16=fp16)
        return cs.run(fs.run(x, batch_size), batch_size), fs.provider_line


def open_export(target: str | os.PathLike, root: str | os.PathLike | None = None,
                progress: ProgressFn | None = None) -> ExportedBackbone:
    """A registry name (exported into ``root`` if needed) or a path to an export folder."""
    p = Path(target)
    if p.is_dir():
        exp = ExportedBackbone(p)
        exp.verify()
        return exp
    return ExportedBackbone(ensure_exported(str(target), root=root, progress=progress))


def predict_files(target: str | os.PathLike, images: Sequence[str | os.PathLike], top: int = 5,
                  provider: str = "auto", root: str | os.PathLike | None = None,
                  fp16: bool = False, progress: ProgressFn | None = None,
                  ) -> tuple[list[Any], str, ExportedBackbone]:
    """Classify image files with an export: ([labels.TopK per image], provider line, export)."""
    from affeq_rt.data.labels import topk
    from affeq_rt.data.preprocess import load_image, preprocess

    if not images:
        raise AffeqError("no images given", "pass one or more image files")
    folder = Path(target)
    if folder.is_dir():
        exp: ExportedBackbone | None = ExportedBackbone(folder)
        exp.verify()
    else:
        exp = None
        get_spec(str(target))  # an unknown name fails before any work
    decoded = [load_image(p) for p in images]  # every file is checked before exporting
    if exp is None:
        exp = ExportedBackbone(ensure_exported(str(target), root=root, progress=progress))
    x = np.stack([preprocess(im, exp.spec) for im in decoded])
    logits, prov = exp.logits(x, provider=provider, fp16=fp16)
    return topk(logits, top, exp.spec.label_offset), prov, exp
