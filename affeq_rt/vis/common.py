"""Shared by the visualisation commands: resolve a network (registry name or export folder),
check a map against two heads, class names, the crop geometry of timm's eval transform, and
bilinear resampling of small maps."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from affeq_rt.data.labels import class_name
from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet, fold_head, load_maps
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.registry.spec import BackboneSpec


def resolve_export(target: str | os.PathLike, export_root: str | os.PathLike | None = None,
                   random_weights: bool = False) -> ExportedBackbone:
    """An export folder (a path holding ``manifest.json``) or a registry name (exported on first
    use into ``export_root``)."""
    p = Path(target)
    if p.is_dir():
        exp = ExportedBackbone(p)
        exp.verify()  # a damaged file is one line here, not a traceback from onnx later
        return exp
    return ensure_exported(str(target), root=export_root, random_weights=random_weights)


def as_mapset(maps: str | os.PathLike | MapSet) -> MapSet:
    """A MapSet from a maps file path or a MapSet."""
    return maps if isinstance(maps, MapSet) else load_maps(maps)


def pair_map(maps: MapSet, src: str, dst: str, d_src: int, d_dst: int) -> AffineMap:
    """The map ``src → dst`` of ``maps``, checked against the two networks' feature widths."""
    m = maps[(src, dst)]  # AffeqError naming the pairs the file has
    if m.weight.shape != (d_dst, d_src):
        raise AffeqError(f"map {src}->{dst} in {maps.path or 'the maps'} is {m.weight.shape[0]}x"
                         f"{m.weight.shape[1]}, but {dst} has {d_dst} features and {src} {d_src}",
                         "fit the maps on these exports (affeq-rt fit)")
    return m


def hybrid_head(m: AffineMap, dst: Head) -> Head:
    """The hybrid's classifier on the source's features, float64: W_B·M [K, d_A], W_B·m + b_B."""
    return fold_head(m, dst)


def label_names(num_classes: int) -> list[str]:
    """ImageNet names for 1000-class heads, else ``class i`` (the digits' ``0``…``9``)."""
    if num_classes == 1000:
        return [class_name(i) for i in range(1000)]
    return [str(i) for i in range(num_classes)]


def crop_geometry(size: tuple[int, int], spec: BackboneSpec) -> tuple[float, float, float]:
    """Where a network's centre crop lies in the ORIGINAL image (``size`` = (W, H)):
    (left, top, side) in original pixels, mirroring ``preprocess.resize_crop``."""
    p = spec.preprocessing
    w, h = size
    scale = math.floor(p.input_size / p.crop_pct)
    nw, nh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    left = int(round((nw - p.input_size) / 2.0))
    top = int(round((nh - p.input_size) / 2.0))
    sx, sy = w / nw, h / nh
    return left * sx, top * sy, p.input_size * (sx + sy) / 2.0


def resample(grid: np.ndarray, size: int, fraction: float = 1.0) -> np.ndarray:
    """Bilinear samples of a [h, w] map on a size×size grid over its centred ``fraction``
    (1 = the whole map, cell centres aligned like an image resize)."""
    from scipy.ndimage import map_coordinates

    g = np.asarray(grid, np.float64)
    h, w = g.shape
    t = (np.arange(size) + 0.5) / size
    u = 0.5 + (t - 0.5) * fraction  # position in [0, 1] of the map's extent
    yy, xx = np.meshgrid(u * h - 0.5, u * w - 0.5, indexing="ij")
    return map_coordinates(g, [yy, xx], order=1, mode="nearest")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (NaN when one is constant)."""
    x = np.asarray(a, np.float64).ravel() - np.mean(a)
    y = np.asarray(b, np.float64).ravel() - np.mean(b)
    d = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / d if d > 0 else float("nan")
