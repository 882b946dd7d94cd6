"""Pooled features at a network's named stages: ``stages.onnx`` beside ``features.onnx``.

A stage is a module of the torch network whose output is one block of its depth: timm's
``feature_info`` modules (``blocks.2``, ``layer3``, a ViT's ``blocks.5``), or for networks without
it (torchvision) the last child of the trunk at each spatial resolution. ``stages.onnx`` maps an
image to ``features`` (exactly the export's features, the classifier's input) and ``stage_1`` …
``stage_K``, each the stage's output averaged globally: over h×w for a feature map (NCHW, or NHWC
where the network says so), over the patch tokens (prefix tokens excluded) for a transformer's
[N, T, C], as is for a vector. It is exported from the framework (TorchScript exporter, as
``features.onnx``) and checked the same way: every output of onnxruntime against torch on real
photos and noise within ``EXPORT_RTOL``, and its ``features`` against ``features.onnx``, so the
stages belong to the very weights of the export. Built lazily (:func:`ensure_stages`) and reused
while ``features.onnx`` is unchanged (its SHA-256 is in the graph's metadata).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path, sha256_file
from affeq_rt.model.build import build_arch, build_with_info
from affeq_rt.model.split import split_model
from affeq_rt.onnx.export import EXPORT_RTOL, OPSET, _rel, check_inputs
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import OrtModel, create_session
from affeq_rt.registry.spec import BackboneSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

STAGES_FILE = "stages.onnx"
META_SOURCE = "affeq_rt.features_sha256"
META_STAGES = "affeq_rt.stages"
META_ERROR = "affeq_rt.stages_error"  # {output: max|ort − torch| / max|torch|} on the check inputs
STAGE_SEP = "@"  # a stage as a store "model": NAME@s3
# Heads of torchvision trunks: never a stage.
_HEAD_CHILDREN = {"fc", "classifier", "heads", "head", "avgpool", "dropout", "flatten"}


@dataclass(frozen=True)
class Stage:
    """One stage: ``name`` (``s1``…), the torch ``module`` path, pooled width, how it is pooled
    (``nchw`` | ``nhwc`` | ``tokens`` | ``vector``), and the map's spatial size (or tokens)."""

    name: str
    module: str
    dim: int
    pool: str
    size: list[int]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (graph metadata, store specs)."""
        return {"name": self.name, "module": self.module, "dim": self.dim, "pool": self.pool,
                "size": list(self.size)}


def stage_model(network: str, stage: str) -> str:
    """The store "model" name of one stage: ``NAME@s3``."""
    return f"{network}{STAGE_SEP}{stage}"


def _candidates(model: torch.nn.Module) -> tuple[list[str], bool]:
    """Module paths that may be stages, and whether they are the network's own list (timm's
    ``feature_info``, kept whole) or candidates to thin to one per resolution."""
    info = getattr(model, "feature_info", None)
    if info is not None:
        entries = info.info if hasattr(info, "info") else info
        return [str(d["module"]) for d in entries], True
    feats = getattr(model, "features", None)
    import torch

    if isinstance(feats, torch.nn.Sequential):
        return [f"features.{n}" for n, _ in feats.named_children()], False
    return [n for n, _ in model.named_children() if n not in _HEAD_CHILDREN], False


def _pool_kind(model: torch.nn.Module, out: Any) -> str | None:
    import torch

    if not isinstance(out, torch.Tensor):
        return None
    if out.ndim == 4:
        return "nhwc" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "nchw"
    if out.ndim == 3:
        return "tokens"
    return "vector" if out.ndim == 2 else None


def _pool(x: torch.Tensor, kind: str, prefix: int) -> torch.Tensor:
    if kind == "nchw":
        return x.mean(dim=(2, 3))
    if kind == "nhwc":
        return x.mean(dim=(1, 2))
    if kind == "tokens":
        return x[:, prefix:].mean(dim=1)
    return x.flatten(1)


def _size(x: torch.Tensor, kind: str, prefix: int) -> list[int]:
    if kind == "nchw":
        return [int(x.shape[2]), int(x.shape[3])]
    if kind == "nhwc":
        return [int(x.shape[1]), int(x.shape[2])]
    if kind == "tokens":
        return [int(x.shape[1]) - prefix]
    return []


def _probe(trunk: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's output on ``x`` (one forward of ``trunk``, hooks removed after)."""
    outs: dict[str, Any] = {}
    hooks = [trunk.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: outs.__setitem__(n, o)) for n in names]
    try:
        trunk(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def find_stages(model: torch.nn.Module, x: torch.Tensor,
                trunk: torch.nn.Module | None = None) -> list[Stage]:
    """The stages of ``model`` from one forward of ``x`` (any device, ``meta`` included).
    ``trunk``: the module whose forward runs (default ``model``); names are ``model``'s."""
    names, whole = _candidates(model)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    import torch

    at = "" if trunk is None else "m."  # split_model's wrappers hold the network as ``m``
    with torch.no_grad():
        got = _probe(trunk or model, [at + n for n in names], x)
    outs = {n: got.get(at + n) for n in names}
    found = []
    for n in names:
        kind = _pool_kind(model, outs.get(n))
        if kind is not None:
            o = outs[n]
            dim = int(o.shape[-1] if kind in ("nhwc", "tokens") else o.flatten(2).shape[1]
                      if kind == "nchw" else o.flatten(1).shape[1])
            found.append((n, kind, dim, _size(o, kind, prefix)))
    if not whole:  # one per resolution: the last module at each (a stage's output)
        last: dict[tuple[int, ...], tuple] = {}
        for f in found:
            if f[1] in ("nchw", "nhwc") and int(np.prod(f[3])) > 1:
                last[tuple(f[3])] = f
        found = sorted(last.values(), key=lambda f: -int(np.prod(f[3])))
    if not found:
        raise AffeqError(f"{type(model).__name__} has no stages affeq-rt can find (no timm "
                         "feature_info and no feature maps in its trunk)",
                         "use a timm or torchvision CNN or vision transformer")
    return [Stage(f"s{i + 1}", n, d, k, s) for i, (n, k, d, s) in enumerate(found)]


def list_stages(spec: BackboneSpec) -> list[Stage]:
    """The stages of a registry network without weights or arithmetic (a forward on torch's
    ``meta`` device: shapes only)."""
    import torch

    if spec.library == "affeq":
        raise AffeqError(f"{spec.name} is a demo network built by its own code",
                         "its stages are listed by affeq-rt demo")
    with torch.device("meta"):
        model = build_arch(spec, random_init=True)
        x = torch.zeros(1, 3, spec.input_size, spec.input_size)
        return find_stages(model, x)


class _StagesModule:
    """Factory of the traced module: image → (features, stage_1 … stage_K)."""

    @staticmethod
    def make(features: torch.nn.Module, stages: list[Stage], prefix: int) -> torch.nn.Module:
        import torch

        class StagesNet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.features = features
                self.outs: list[torch.Tensor] = []
                for st in stages:
                    features.get_submodule(f"m.{st.module}").register_forward_hook(
                        lambda _m, _i, o, st=st: self.outs.append(_pool(o, st.pool, prefix)))

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                self.outs.clear()
                f = self.features(x)
                pooled, self.outs = list(self.outs), []
                return (f, *pooled)

        return StagesNet().eval()


def _names(stages: list[Stage]) -> list[str]:
    return ["features", *[f"stage_{i + 1}" for i in range(len(stages))]]


def export_stages(model: torch.nn.Module, exp: ExportedBackbone | str | os.PathLike,
                  stages: list[Stage] | None = None,
                  inputs: np.ndarray | None = None, tolerance: float = EXPORT_RTOL) -> Path:
    """Write ``stages.onnx`` into the export folder of ``model`` (the very network of its
    ``features.onnx``); checked against torch and against ``features.onnx`` on ``inputs``
    (default: the export's check photos and noise). Returns its path."""
    import onnx
    import torch

    exp = exp if isinstance(exp, ExportedBackbone) else ExportedBackbone(exp)
    model = model.eval()
    features, _ = split_model(model)
    x = inputs if inputs is not None else check_inputs(exp.spec)[0]
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    if stages is None:
        stages = find_stages(model, xt[:1], trunk=features)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    net = _StagesModule.make(features, stages, prefix)
    with torch.no_grad():
        ref = [t.double().numpy() for t in net(xt)]
    names = _names(stages)
    digest = sha256_file(exp.features_path)
    out = exp.path / STAGES_FILE
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (xt[:2],), str(tmp), input_names=["image"], output_names=names,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False,
                          dynamic_axes={"image": {0: "N"}, **{n: {0: "N"} for n in names}})
        m = onnx.load(str(tmp))
        onnx.checker.check_model(m, full_check=True)
        onnx.helper.set_model_props(m, {META_SOURCE: digest, META_STAGES: json.dumps(
            [s.to_dict() for s in stages])})
        onnx.save(m, str(tmp))
        sess = create_session(tmp, provider="cpu")
        got = sess.run_feeds({"image": np.ascontiguousarray(x, np.float32)})
        own = create_session(exp.features_path, provider="cpu").run(x, batch_size=len(x))
        checks = [(n, _rel(np.asarray(g, np.float64), r))
                  for n, g, r in zip(names, got, ref, strict=True)]
        checks.append(("features vs features.onnx",
                       _rel(np.asarray(got[0], np.float64), own.astype(np.float64))))
        onnx.helper.set_model_props(m, {META_SOURCE: digest, META_STAGES: json.dumps(
            [s.to_dict() for s in stages]), META_ERROR: json.dumps(dict(checks))})
        onnx.save(m, str(tmp))
        for what, err in checks:
            if not np.isfinite(err) or err > tolerance:
                raise AffeqError(f"{exp.name}: stages.onnx {what} differ from the reference by "
                                 f"{err:.3g} (relative, tolerance {tolerance:g})",
                                 "stages.onnx was not written; report it")
    return out


@dataclass
class StagesModel:
    """An opened ``stages.onnx``: ``run(x)`` → ``{"features": [N, d], "s1": [N, d1], …}``."""

    path: Path
    session: OrtModel
    stages: list[Stage]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Pooled features of preprocessed images ``x`` [N, 3, S, S], float32."""
        if len(x) == 0:
            return {"features": np.zeros((0, 0), np.float32),
                    **{s.name: np.zeros((0, s.dim), np.float32) for s in self.stages}}
        outs = self.session.run_feeds({self.session.input_names[0]:
                                       np.ascontiguousarray(x, np.float32)})
        keys = ["features", *[s.name for s in self.stages]]
        return {k: np.asarray(o, np.float32).reshape(len(x), -1)
                for k, o in zip(keys, outs, strict=True)}


def read_stages(path: Path, digest: str | None = None) -> list[Stage] | None:
    """The stages recorded in ``stages.onnx``, or None when it is missing or was built from
    another ``features.onnx`` than ``digest``."""
    if not path.is_file():
        return None
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
             .metadata_props}
    if digest is not None and props.get(META_SOURCE) != digest:
        return None
    try:
        return [Stage(**d) for d in json.loads(props[META_STAGES])]
    except (KeyError, TypeError, ValueError):
        return None


def ensure_stages(exp: ExportedBackbone | str | os.PathLike,
                  provider: str = "auto") -> StagesModel:
    """Open the export's ``stages.onnx``, building it first when it is missing or stale (the
    network rebuilt in torch with the export's own weights)."""
    exp = exp if isinstance(exp, ExportedBackbone) else ExportedBackbone(exp)
    path = exp.path / STAGES_FILE
    stages = read_stages(path, sha256_file(exp.features_path))
    if stages is None:
        if exp.spec.library == "affeq":
            raise AffeqError(f"{exp.name} has no stages.onnx and is built by its own code",
                             "export its stages with onnx.stages.export_stages(model, folder)")
        if not os.access(exp.path, os.W_OK):
            raise AffeqError(f"export folder {exp.path} is read-only, so stages.onnx cannot be "
                             "added", "use a writable --export-root")
        w = exp.manifest.get("weights") or {}
        rnd = w.get("source") == "random"
        model, _ = build_with_info(exp.spec, None if rnd else w.get("path"), rnd)
        export_stages(model, exp)
        stages = read_stages(path)
        if stages is None:  # pragma: no cover - just written
            raise AffeqError(f"{path} lost its stage list", "delete it and rerun")
    return StagesModel(path, create_session(path, provider=provider), stages)
