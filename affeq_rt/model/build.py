"""Build a registry backbone in torch: the architecture (timm/torchvision) plus its weights source.

Weights come from the spec (an installed package, a local file, the local hub cache), from a
``--weights FILE``, or are random (seeded). Hub weights missing from the cache are downloaded on
first use, unless ``HF_HUB_OFFLINE=1`` (or ``--offline``) keeps the run offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import sha256_file
from affeq_rt.model.weights import (
    OFFLINE_ENV,
    adapt,
    hub_file,
    hub_location,
    load_state_dict,
    load_strict,
    package_file,
)
from affeq_rt.registry.spec import BackboneSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

RANDOM_SEED = 0


def _default_source(spec: BackboneSpec) -> tuple[Path, str]:
    """The spec's own weights file and a stable description of it, or AffeqError."""
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
        if p is None:  # only when offline: otherwise hub_file downloads or raises
            loc = hub_location(str(w.hub))
            raise AffeqError(f"{spec.name}'s weights {loc.file} of {w.hub} are not in the cache "
                             f"{loc.cache} and downloads are off ({OFFLINE_ENV}=1 or --offline)",
                             f"unset {OFFLINE_ENV} (drop --offline) to download them, or pass "
                             "--weights FILE (a state dict for this architecture) or "
                             "--random-weights")
        return p, f"hub:{w.hub}"
    raise AffeqError(f"{spec.name} has no registered weights",
                     "pass --weights FILE or --random-weights")


def weights_request(spec: BackboneSpec, weights: str | os.PathLike | None,
                    random_weights: bool) -> dict[str, Any]:
    """Describe which weights a build would use (no loading): ``source``, ``path``."""
    if random_weights and weights is not None:
        raise AffeqError("both --weights and --random-weights given", "pass only one")
    if random_weights:
        return {"source": "random", "path": None, "seed": RANDOM_SEED}
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise AffeqError(f"weights file {p} does not exist", "check the --weights path")
        return {"source": f"file:{p.resolve()}", "path": str(p)}
    path, source = _default_source(spec)
    return {"source": source, "path": str(path)}


def build_arch(spec: BackboneSpec, random_init: bool) -> torch.nn.Module:
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
        if "builder_kwargs" in spec.extra:  # a resolved spec: as the builder makes it for its
            kwargs.update(spec.extra["builder_kwargs"])  # weights (ViT image_size, aux heads)
        elif spec.arch == "googlenet":  # as torchvision builds it for its ported TF weights
            kwargs.update(aux_logits=False, transform_input=True, init_weights=random_init)
        try:
            model = tvm.get_model(spec.arch, **kwargs)
        except ValueError as e:
            raise AffeqError(f"torchvision has no architecture {spec.arch!r} ({e})",
                             "fix the spec's arch") from None
    else:
        raise AffeqError(f"{spec.name}: {spec.library!r} models are built by their own code",
                         "call onnx.export.export_split with the trained module")
    return model.eval()


# Auxiliary classifiers torchvision's checkpoints carry and the built (eval) network lacks.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def _library_layout(spec: BackboneSpec, state: dict[str, Any],
                    model: torch.nn.Module) -> dict[str, Any]:
    """A checkpoint in the model's own key layout, as the library would load it: for resolved
    torchvision specs the auxiliary heads are dropped; for timm, a checkpoint whose keys do not
    fit as they are goes through the architecture module's ``checkpoint_filter_fn`` (what
    ``timm.create_model(pretrained=True)`` applies: original-layout ConvNeXt, ViT, … files)."""
    target = model.state_dict()
    if spec.library == "torchvision" and "resolved_from" in spec.extra:
        state = {k: v for k, v in state.items()
                 if k in target or not k.startswith(AUX_PREFIXES)}
    if spec.library == "timm" and set(state) != set(target):
        import importlib

        filt = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn",
                       None)
        if filt is not None:
            try:
                state = dict(filt(state, model))
            except Exception:  # noqa: BLE001 - not this layout either: load_strict names the keys
                return state
    return state


def _live_head(model: torch.nn.Module) -> None:
    """Random weights: a classifier the architecture initialises to zero (MLP-Mixer, torchvision
    ViT) gets seeded N(0, 0.02²) weights, else every logit is its bias whatever the image and the
    export, hybrid and agreement checks downstream would compare constants."""
    import torch

    get = getattr(model, "get_classifier", None)
    heads = get() if get is not None else \
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    for h in heads if isinstance(heads, (tuple, list)) else [heads]:
        for m in h.modules():  # a Linear, or one inside a head module (timm's ClassifierHead)
            w = getattr(m, "weight", None) if isinstance(m, (torch.nn.Linear,
                                                             torch.nn.Conv2d)) else None
            if isinstance(w, torch.Tensor) and not w.is_meta and not bool(w.detach().any()):
                with torch.no_grad():
                    w.normal_(0.0, 0.02)


def build_with_info(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                    random_weights: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode and a description of its weights (for export manifests)."""
    import torch

    info = weights_request(spec, weights, random_weights)
    if random_weights:
        torch.manual_seed(int(info["seed"]))
    model = build_arch(spec, random_init=random_weights)
    if random_weights:
        _live_head(model)
    else:
        path = Path(info["path"])
        state = load_state_dict(path)
        adapter = spec.weights.adapter
        load_strict(model, _library_layout(spec, adapt(state, model, adapter), model), str(path))
        info.update(sha256=sha256_file(path), adapter=adapter)
    return model.eval(), info


def build_model(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                random_weights: bool = False) -> torch.nn.Module:
    """A registry backbone in eval mode with its weights (the spec's, a file, or random)."""
    model, _ = build_with_info(spec, weights, random_weights)
    return model
