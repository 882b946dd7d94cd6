"""Resolve any timm or torchvision classifier name into a registry spec from the library's metadata.

The curated JSON specs (``models/``) come first (``spec.get_spec``); a name they do not know is
looked up here: a timm name with or without its pretrained tag (``convnext_tiny``,
``convnext_tiny.fb_in1k``; preprocessing, classes and weights from timm's ``pretrained_cfg``) or
a torchvision classification model (``torchvision/resnet50.IMAGENET1K_V2``, canonical
``tv_resnet50.IMAGENET1K_V2``; preprocessing and classes from the weights enum's ``transforms``
and ``meta``). The result is the registry's JSON form, which ``spec.get_spec`` validates into a
``BackboneSpec`` exactly as it does a spec file: the library's metadata is one more file edge.

Heads over other label sets than ImageNet-1k (ImageNet-21k/22k/12k, iNaturalist, CLIP
embeddings, …) are refused unless agreement mode is asked for (``allow_other_labels``, or
``AFFEQ_RT_OTHER_LABELS=1`` for every command): then only label-free measures (agreement) and
hybrids are meaningful, and class names are plain indices.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from affeq_rt.errors import AffeqError

if TYPE_CHECKING:  # pragma: no cover
    import torch

TORCHVISION_PREFIXES = ("torchvision/", "torchvision:", "tv/")
TV_PREFIX = "tv_"  # canonical torchvision names: tv_<model>[.<WEIGHTS>] (folder-safe)
IMAGENET_1K = "imagenet-1k"
OTHER_LABELS_ENV = "AFFEQ_RT_OTHER_LABELS"
OTHER_LABELS_FIX = (f"pass --other-labels / allow_other_labels=True (or set {OTHER_LABELS_ENV}=1) "
                    "for agreement mode, or pick an ImageNet-1k tag")


def other_labels_default() -> bool:
    """Agreement mode asked for through the environment (``AFFEQ_RT_OTHER_LABELS=1``)."""
    return os.environ.get(OTHER_LABELS_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Resolvable:
    """One name ``affeq-rt models --all`` lists: what it is and whether it can be used as is."""

    name: str
    library: str
    label_set: str  # imagenet-1k, imagenet-21k-goog, …, or "another label set"
    weights_offline: bool
    curated: bool = False

    @property
    def imagenet_1k(self) -> bool:
        """Resolves without agreement mode."""
        return self.label_set == IMAGENET_1K


# ---------------------------------------------------------------------------------------------
# shared helpers


def _crop_pct_for(size: int, resize: int) -> float:
    """crop_pct whose ``floor(size / crop_pct)`` (our and timm's resize rule) gives ``resize``
    exactly: ``size / resize`` rounded to the fewest decimals that keep it (224/232 → 0.9655)."""
    exact = size / resize
    for digits in range(3, 9):
        c = round(exact, digits)
        if 0 < c <= 1 and math.floor(size / c) == resize:
            return c
    return exact


def _label_set(num_classes: int, cfg: Any = None) -> str:
    """timm's name for a head's label set (``infer_imagenet_subset``), else ``other (K)``."""
    if cfg is not None:
        from timm.data import infer_imagenet_subset

        subset = infer_imagenet_subset(cfg)
        if subset:
            return str(subset)
    return IMAGENET_1K if num_classes == 1000 else "another label set"


def _check_labels(name: str, label_set: str, num_classes: int, allow_other_labels: bool,
                  alternatives: list[str] | None = None) -> None:
    """AffeqError for a head-less model, or (outside agreement mode) a non-ImageNet-1k head;
    ``alternatives`` are ImageNet-1k names of the same architecture to suggest."""
    alt = f"ImageNet-1k tags: {', '.join(alternatives[:4])}" if alternatives else None
    if num_classes <= 0:
        raise AffeqError(f"{name} has no classifier head (a feature extractor: num_classes 0)",
                         f"use {alt}" if alt else "pick a classification model or tag")
    if label_set != IMAGENET_1K and not allow_other_labels:
        raise AffeqError(f"{name}'s head scores {label_set} ({num_classes} outputs), not the "
                         "ImageNet-1k classes the accuracy measures need",
                         f"{OTHER_LABELS_FIX}{f' ({alt})' if alt else ''}")


def _head_width(model: torch.nn.Module, classifier: Any) -> int:
    """Input width of a classifier (Linear, 1×1 Conv2d, or the first of a tuple of heads)."""
    import torch

    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    if isinstance(classifier, torch.nn.Linear):
        return int(classifier.in_features)
    if isinstance(classifier, torch.nn.Conv2d):
        return int(classifier.in_channels)
    if isinstance(getattr(classifier, "linear", None), torch.nn.Linear):  # LeViT's BN + Linear
        return int(classifier.linear.in_features)
    if isinstance(classifier, torch.nn.Module) and not isinstance(classifier, torch.nn.ModuleList):
        inner = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
        if inner:  # a timm head module (ClassifierHead, MlpHead, RepViT's): its last Linear
            return int(inner[-1].in_features)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if classifier is None and last:
        return int(last[-1].in_features)
    what = (f"its classifier is {type(classifier).__name__}" if classifier is not None else
            "it has no Linear layer (e.g. SqueezeNet: conv, ReLU, then pooling)")
    raise AffeqError(f"{type(model).__name__} cannot be split into features and one linear "
                     f"layer: {what}", "pick a model whose classifier is one Linear layer")


def _on_meta(build: Any) -> torch.nn.Module:
    """Build on the meta device (shapes only: no memory, no init cost), on CPU if that fails."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - some architectures compute values at init; build for real
        return build()


# ---------------------------------------------------------------------------------------------
# timm


@lru_cache(maxsize=1)
def _timm_pretrained() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models(pretrained=True))


@lru_cache(maxsize=1)
def _timm_archs() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def hf_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, else
    ``HF_HOME``/hub, else ``$XDG_CACHE_HOME``/huggingface/hub, as huggingface_hub resolves it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _timm_offline(hub_id: str | None) -> bool:
    if not hub_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    for fname in ("model.safetensors", "pytorch_model.bin"):
        got = try_to_load_from_cache(hub_id, fname, cache_dir=str(hf_cache()))
        if isinstance(got, str) and os.path.isfile(got):
            return True
    return False


def _timm_spec(name: str, allow_other_labels: bool) -> dict[str, Any] | None:
    """The registry JSON for a timm name (``arch`` or ``arch.tag``), or None if timm lacks it."""
    import timm

    key = name.strip().lower()
    arch, _, tag = key.partition(".")
    if arch not in _timm_archs():
        return None
    if tag and f"{arch}.{tag}" not in _timm_pretrained():
        known = [n for n in _timm_pretrained() if n.partition(".")[0] == arch]
        raise AffeqError(f"timm has no pretrained tag {key!r}",
                         f"use one of {', '.join(known[:6]) or arch}")
    # no tag: timm's default one, as timm.create_model(arch) picks it
    pcfg = timm.models.get_pretrained_cfg(key if tag else arch)
    full = f"{arch}.{pcfg.tag}" if pcfg is not None and pcfg.tag else arch
    cfg: dict[str, Any] = pcfg.to_dict() if pcfg is not None else {}
    num_classes = int(cfg.get("num_classes", 1000) or 0)
    label_set = _label_set(num_classes, pcfg)
    if label_set != IMAGENET_1K:
        alts = [n for n in _timm_pretrained() if n.partition(".")[0] == arch
                and _label_set(int(timm.models.get_pretrained_cfg(n).num_classes or 0),
                               timm.models.get_pretrained_cfg(n)) == IMAGENET_1K]
        _check_labels(key, label_set, num_classes, allow_other_labels, alts)
    size = cfg.get("input_size") or (3, 224, 224)
    if size[-1] != size[-2] or size[0] != 3:
        raise AffeqError(f"{key} takes {tuple(size)} inputs; affeq-rt handles square RGB inputs "
                         "only", "pick another tag or model")
    model = _on_meta(lambda: timm.create_model(full, pretrained=False, num_classes=num_classes))
    hub = cfg.get("hf_hub_id")
    notes = [f"Resolved from timm {timm.__version__}'s pretrained_cfg for {full} (not curated: "
             "no faithfulness note, no expected accuracy)."]
    if hub and hub == f"timm/{full}":
        weights: dict[str, Any] = {"kind": "hub", "hub": hub}
    elif hub or cfg.get("url"):
        weights = {"kind": "none"}
        notes.append(f"Its weights ({hub or cfg.get('url')}) are not in timm's own hub layout: "
                     "pass --weights FILE (a state dict for this architecture) or "
                     "--random-weights.")
    else:
        weights = {"kind": "none"}
        notes.append("timm has no pretrained weights for it: pass --weights FILE or "
                     "--random-weights.")
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        notes.append(f"timm evaluates it with crop_mode={mode!r}; affeq-rt centre-crops, so "
                     "accuracy may differ slightly from timm's.")
    if label_set != IMAGENET_1K:
        notes.append(f"Agreement mode: its head scores {label_set}, so only label-free measures "
                     "(agreement) and hybrids are meaningful; class names are indices.")
    return {
        "name": key, "aliases": [], "paper_name": None, "library": "timm", "arch": full,
        "weights": weights, "input_size": int(size[-1]),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "interpolation": str(cfg.get("interpolation") or "bicubic"),
        "mean": [float(v) for v in cfg.get("mean")], "std": [float(v) for v in cfg.get("std")],
        "feature_dim": _head_width(model, model.get_classifier()),
        "num_classes": num_classes, "label_offset": int(cfg.get("label_offset") or 0),
        "expected_top1": None, "tags": ["resolved"], "note": " ".join(notes),
        "resolved_from": "timm", "label_set": label_set,
    }


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision() -> Any:
    """``torchvision.models``, or AffeqError when torchvision does not import beside this torch."""
    try:
        import torchvision.models as tvm
    except Exception as e:  # noqa: BLE001 - ImportError, or a binary mismatch with torch
        raise AffeqError(f"torchvision does not import here ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})",
                         "install the torchvision matching your torch, or use a timm name"
                         ) from None
    return tvm


def torchvision_key(name: str) -> str | None:
    """``model[.WEIGHTS]`` if ``name`` asks for torchvision (``torchvision/…``, ``tv_…``)."""
    n = name.strip()
    for p in (*TORCHVISION_PREFIXES, TV_PREFIX):
        if n.lower().startswith(p):
            return n[len(p):]
    return None


@lru_cache(maxsize=1)
def _tv_models() -> tuple[str, ...]:
    tvm = _torchvision()
    return tuple(sorted(tvm.list_models(module=tvm)))


def _tv_weight(model: str, member: str | None) -> Any:
    tvm = _torchvision()
    enum = tvm.get_model_weights(model)
    if member is None:
        return enum.DEFAULT
    for m in enum:
        if m.name.lower() == member.lower():
            return m
    raise AffeqError(f"torchvision's {model} has no weights {member!r}",
                     f"use one of {', '.join(m.name for m in enum)}")


def _tv_offline(w: Any) -> bool:
    import torch

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints",
                                       w.url.rsplit("/", 1)[-1]))


def _tv_spec(key: str, allow_other_labels: bool) -> dict[str, Any]:
    """The registry JSON for ``model[.WEIGHTS]`` of torchvision; AffeqError if unknown."""
    tvm = _torchvision()
    model_name, _, member = key.partition(".")
    model_name = model_name.lower()
    if model_name not in _tv_models():
        import difflib

        close = difflib.get_close_matches(model_name, _tv_models(), n=5, cutoff=0.5)
        raise AffeqError(f"torchvision has no classification model {model_name!r}",
                         f"closest: {', '.join(close)}" if close else
                         "see `affeq-rt models --all 'tv_*'`")
    w = _tv_weight(model_name, member or None)
    num_classes = len(w.meta.get("categories") or ())  # None: weights without a trained head
    label_set = _label_set(num_classes)
    name = f"{TV_PREFIX}{model_name}" + (f".{w.name}" if member else "")
    _check_labels(name, label_set, num_classes, allow_other_labels)
    t = w.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if "min_size" in w.meta and model_name.startswith("vit_"):
        kwargs["image_size"] = crop  # torchvision's builder sets this from the weights
    if model_name in ("googlenet", "inception_v3"):  # as the builder makes them for the weights
        kwargs.update(aux_logits=False, transform_input=True, init_weights=False)
    model = _on_meta(lambda: tvm.get_model(model_name, **kwargs))
    notes = [f"Resolved from torchvision's {type(w).__name__}.{w.name} (transforms and meta; "
             "not curated)."]
    if label_set != IMAGENET_1K:
        notes.append(f"Agreement mode: its head scores {label_set}.")
    acc = (w.meta.get("_metrics") or {}).get("ImageNet-1K", {}).get("acc@1")
    return {
        "name": name, "aliases": [f"torchvision/{name[len(TV_PREFIX):]}"], "paper_name": None,
        "library": "torchvision", "arch": model_name,
        "weights": {"kind": "hub", "hub": f"torchvision/{type(w).__name__}.{w.name}"},
        "input_size": crop, "crop_pct": _crop_pct_for(crop, resize),
        "interpolation": str(t.interpolation.value), "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std], "feature_dim": _head_width(model, None),
        "num_classes": num_classes, "label_offset": 0,
        "expected_top1": None if acc is None else float(acc), "tags": ["resolved"],
        "note": " ".join(notes), "resolved_from": "torchvision", "label_set": label_set,
        "builder_kwargs": {k: v for k, v in kwargs.items() if k not in ("weights", "num_classes")},
    }


# ---------------------------------------------------------------------------------------------
# front door


@lru_cache(maxsize=256)
def resolve_library_name(name: str, allow_other_labels: bool = False) -> dict[str, Any] | None:
    """The registry JSON form for a timm/torchvision name, None if neither library knows it;
    AffeqError for a known name that cannot be used (other labels, no head, bad tag)."""
    tv = torchvision_key(name)
    if tv is not None:
        return _tv_spec(tv, allow_other_labels)
    return _timm_spec(name, allow_other_labels)


def library_names() -> list[str]:
    """Every name resolution accepts (timm architectures and pretrained tags, ``tv_`` models):
    the pool unknown names are matched against."""
    names = set(_timm_archs()) | set(_timm_pretrained())
    with contextlib.suppress(AffeqError):  # torchvision absent or broken: timm names only
        names |= {f"{TV_PREFIX}{m}" for m in _tv_models()}
    return sorted(names)


def list_resolvable(pattern: str | None = None) -> list[Resolvable]:
    """Every pretrained timm tag and torchvision weight matching the fnmatch ``pattern`` (timm's
    ``list_models`` rule; ``tv_*`` for torchvision), sorted, with its label set and whether its
    weights are in the local cache."""
    import timm

    pat = (pattern or "*").lower()
    out: list[Resolvable] = []
    for n in _timm_pretrained():
        if fnmatch.fnmatch(n, pat) or fnmatch.fnmatch(n.partition(".")[0], pat):
            cfg = timm.models.get_pretrained_cfg(n)
            k = int(cfg.num_classes or 0)
            label = _label_set(k, cfg) if k else "none: no classifier head, not resolvable"
            out.append(Resolvable(n, "timm", label, _timm_offline(cfg.hf_hub_id)))
    try:
        tvm = _torchvision()
        for m in _tv_models():
            for w in tvm.get_model_weights(m):
                n = f"{TV_PREFIX}{m}.{w.name}"
                if fnmatch.fnmatch(n.lower(), pat) or fnmatch.fnmatch(f"{TV_PREFIX}{m}", pat):
                    k = len(w.meta.get("categories") or ())  # None: VGG16's features-only
                    label = _label_set(k) if k else "none: no classifier head, not resolvable"
                    out.append(Resolvable(n, "torchvision", label, _tv_offline(w)))
    except AffeqError:
        pass
    return sorted(out, key=lambda r: r.name)
