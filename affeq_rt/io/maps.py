"""Affine maps between feature spaces and their safetensors file format (see ARCHITECTURE.md).

``x̃_dst = W x_src + b``. A maps file holds every ordered pair of a fit: tensors
``"{src}->{dst}.weight"`` [d_dst, d_src] and ``"{src}->{dst}.bias"`` [d_dst] (float32), plus JSON
metadata under the key ``affeq_rt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import atomic_path, jsonable
from affeq_rt.io.heads import Head

FORMAT = 1
META_KEY = "affeq_rt"


@dataclass
class AffineMap:
    """A fitted map ``src`` → ``dst``: ``weight`` [d_dst, d_src], ``bias`` [d_dst]."""

    src: str
    dst: str
    weight: np.ndarray
    bias: np.ndarray
    method: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``"src->dst"``, the tensor-name prefix in a maps file."""
        return f"{self.src}->{self.dst}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Map features ``x`` [n, d_src] → [n, d_dst] (float32 in, float32 out)."""
        return np.asarray(x, np.float32) @ self.weight.T + self.bias


def fold_head(m: AffineMap, dst: Head) -> Head:
    """The target's head folded into the map, in float64: the head on the source's features,
    ``W_dst·W`` [K, d_src] and ``W_dst·b + b_dst`` (its rows and ``label_offset`` as ``dst``'s)."""
    wd = np.asarray(dst.weight, np.float64)
    return Head(wd @ m.weight.astype(np.float64),
                wd @ m.bias.astype(np.float64) + np.asarray(dst.bias, np.float64), dst.label_offset)


class MapSet(Mapping[tuple[str, str], AffineMap]):
    """THE type for a set of maps: ``(src, dst)`` → :class:`AffineMap`; a missing pair raises
    AffeqError. ``fit`` returns one, ``save_maps``/``load_maps`` write/read one, ``evaluate`` and
    ``build_hybrid`` take one. ``meta`` holds the file-level metadata (method, source, …)."""

    def __init__(self, maps: Iterable[AffineMap], meta: Mapping[str, Any] | None = None,
                 path: str = "") -> None:
        self._maps: dict[tuple[str, str], AffineMap] = {}
        for m in maps:
            if not isinstance(m, AffineMap):
                raise InternalError(f"MapSet holds AffineMap values, got {type(m).__name__}")
            self._maps[(m.src, m.dst)] = m
        self.meta = dict(meta or {})
        self.path = path

    def __getitem__(self, key: tuple[str, str]) -> AffineMap:
        try:
            return self._maps[key]
        except KeyError:
            raise AffeqError(f"maps file {self.path or '(in memory)'} has no map {key[0]}->{key[1]}"
                             f" (it has {', '.join(f'{a}->{b}' for a, b in self._maps) or 'none'})",
                             "fit that pair with affeq-rt fit --models including both") from None

    def __contains__(self, key: object) -> bool:
        return key in self._maps

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def models(self) -> list[str]:
        """Every model named by the maps (the file's metadata order when read from a file)."""
        named = list(self.meta.get("models", {}))
        for a, b in self._maps:
            named += [m for m in (a, b) if m not in named]
        return named


# Keys save_maps derives from the maps themselves (never copied from ``MapSet.meta``).
_DERIVED = ("format", "models", "pairs")


def save_maps(path: str | os.PathLike, maps: MapSet, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``maps`` to a safetensors file, atomically; the file's metadata is ``maps.meta``
    updated with ``meta`` (``format``/``models``/``pairs`` are always derived from the maps)."""
    from safetensors.numpy import save_file

    if not maps:
        raise AffeqError("no maps to save", "fit at least two models")
    tensors: dict[str, np.ndarray] = {}
    models: dict[str, dict[str, int]] = {}
    pairs: dict[str, dict[str, Any]] = {}
    for m in maps.values():
        w = np.ascontiguousarray(m.weight, np.float32)
        b = np.ascontiguousarray(m.bias, np.float32).reshape(-1)
        if w.ndim != 2 or w.shape[0] != b.shape[0]:
            raise InternalError(f"{m.key}: weight {w.shape} and bias {b.shape} disagree")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise AffeqError(f"map {m.key} has NaN/Inf entries", "check the input features")
        tensors[f"{m.key}.weight"] = w
        tensors[f"{m.key}.bias"] = b
        models.setdefault(m.src, {"feature_dim": int(w.shape[1])})
        models.setdefault(m.dst, {"feature_dim": int(w.shape[0])})
        pairs[m.key] = {"method": m.method, **m.stats}
    extra = {k: v for k, v in {**maps.meta, **(meta or {})}.items() if k not in _DERIVED}
    doc = {"format": FORMAT, **extra, "models": models, "pairs": pairs}
    p = Path(path)
    with atomic_path(p, need=sum(t.nbytes for t in tensors.values())) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(doc, default=jsonable)})
    return p


def load_maps(path: str | os.PathLike) -> MapSet:
    """Read a maps file; a missing, corrupt or foreign file raises AffeqError."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise AffeqError(f"maps file {p} does not exist",
                         "run affeq-rt fit first, or check the path")
    try:
        with safe_open(str(p), framework="numpy") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise AffeqError(f"maps file {p} is corrupt ({e})", "fit the maps again") from None
    if raw is None:
        raise AffeqError(f"{p} is a safetensors file without affeq-rt metadata",
                         "pass a maps file written by affeq-rt fit")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AffeqError(f"maps file {p} has corrupt metadata ({e})",
                         "fit the maps again") from None
    if not isinstance(meta, dict):
        raise AffeqError(f"maps file {p} has corrupt metadata (not a JSON object)",
                         "fit the maps again")
    if meta.get("format") != FORMAT:
        raise AffeqError(f"maps file {p} has format {meta.get('format')!r}, expected {FORMAT}",
                         "refit with this affeq-rt version")
    maps = [_read_pair(p, key, st, tensors) for key, st in _pairs(p, meta).items()]
    return MapSet(maps, meta, str(p))


def _pairs(p: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The ``pairs`` table of a maps file's metadata, checked (AffeqError naming the fault)."""
    pairs = meta.get("pairs", {})
    models = meta.get("models", {})
    if not isinstance(pairs, dict) or not isinstance(models, dict):
        raise AffeqError(f"maps file {p} has corrupt metadata ('pairs' or 'models' is not an "
                         "object)", "fit the maps again")
    return pairs


def _read_pair(p: Path, key: Any, st: Any, tensors: dict[str, np.ndarray]) -> AffineMap:
    """One map of a maps file, its metadata and tensors checked (AffeqError naming the pair)."""
    src, sep, dst = str(key).partition("->")
    if not (sep and src and dst and isinstance(st, dict)):
        raise AffeqError(f"maps file {p} has corrupt metadata for pair {key!r} (not 'A->B' with "
                         "an object of statistics)", "fit the maps again")
    try:
        w, b = tensors[f"{key}.weight"], tensors[f"{key}.bias"]
    except KeyError:
        raise AffeqError(f"maps file {p} lists pair {key} but lacks its tensors",
                         "fit the maps again") from None
    if (w.ndim != 2 or b.ndim != 1 or w.shape[0] != b.shape[0] or w.dtype.kind != "f"
            or b.dtype.kind != "f"):
        raise AffeqError(f"maps file {p} holds a {w.dtype} {list(w.shape)} weight and a {b.dtype} "
                         f"{list(b.shape)} bias for {key}, not [d_dst, d_src] and [d_dst] floats",
                         "fit the maps again")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise AffeqError(f"maps file {p} holds NaN/Inf in map {key}", "fit the maps again")
    st = dict(st)
    method = st.pop("method", "unknown")
    return AffineMap(src, dst, w, b, str(method), st)
