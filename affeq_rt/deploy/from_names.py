"""From two network names to a written hybrid: export both, get the map, compose (build-hybrid).

:func:`hybrid` is what ``affeq-rt build-hybrid`` does. The map ``src->dst`` comes from a
:class:`MapSource`: a maps file (:class:`MapsFile`), a fit on an image folder (:class:`FitOn`,
through :func:`~affeq_rt.method.fit.fit`) or, given neither, the data-free logit-pinv map
(:class:`DataFree`, :data:`DATA_FREE`, also through ``fit``). Each source refuses what it cannot
do before any export (``check``) and makes the map from the two exports (``make``);
:func:`~affeq_rt.deploy.hybrid.build_hybrid` then composes it with them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from affeq_rt.deploy.hybrid import HybridOptions, build_hybrid, check_map, output_path
from affeq_rt.deploy.verify import first_images
from affeq_rt.errors import AffeqError
from affeq_rt.io.maps import AffineMap, MapSet, load_maps
from affeq_rt.method.extract import ImageOptions
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.rows import ArraySource
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.progress import Progress, or_silent
from affeq_rt.registry.spec import BackboneSpec, get_spec

# What the map is when no data is given (thesis §5.5, "Logit Compatibility"); {how}: how exactly.
DATA_FREE = ("logit-pinv, the data-free map (thesis §5.5; it needs no images): A's logits decoded "
             "through the pseudo-inverse of B's classifier, so the hybrid classifies as A does "
             "({how}); to map the features themselves, fit on images (--fit-on DIR)")


class MapSource(Protocol):
    """Where a hybrid's map comes from: a maps file (:class:`MapsFile`), a fit on images
    (:class:`FitOn`) or the data-free map (:class:`DataFree`)."""

    def check(self, a: BackboneSpec, b: BackboneSpec) -> None:
        """Refuse what cannot give the map a→b, before any export or fit."""

    def make(self, a: ExportedBackbone, b: ExportedBackbone, images: ImageOptions,
             progress: Progress | None) -> AffineMap:
        """The map a→b."""

    def record(self) -> dict[str, Any]:
        """What the hybrid's metadata says of it (``maps_file``, ``fit_on``)."""


class MapsFile:
    """The map of a maps file (``affeq-rt fit --out``) or an in-memory :class:`MapSet`."""

    def __init__(self, maps: MapSet | str | os.PathLike) -> None:
        self.path = getattr(maps, "path", maps)
        self.maps = maps if isinstance(maps, MapSet) else load_maps(maps)

    def check(self, a: BackboneSpec, b: BackboneSpec) -> None:
        """The file holds a→b and it fits both networks (names, shape, finite entries)."""
        check_map(self.maps[a.name, b.name], a, b)

    def make(self, a: ExportedBackbone, b: ExportedBackbone, images: ImageOptions,  # noqa: ARG002
             progress: Progress | None) -> AffineMap:  # noqa: ARG002
        """The file's map a→b, as it is."""
        return self.maps[a.name, b.name]

    def record(self) -> dict[str, Any]:
        """The maps file's path."""
        return {"maps_file": str(self.path), "fit_on": None}


@dataclass(frozen=True)
class FitOn:
    """Fit the hybrid's map on the image folder ``data`` with ``method`` (and ``options``);
    ``hybrid(..., fit_on="photos/")`` is ``FitOn("photos/")``."""

    data: str | os.PathLike
    method: str = "auto"
    options: FitOptions | None = None

    def check(self, a: BackboneSpec, b: BackboneSpec) -> None:  # noqa: ARG002
        """``data`` is a folder."""
        if not Path(self.data).is_dir():
            raise AffeqError(f"--fit-on {self.data} is not a folder", "pass a folder of images")

    def make(self, a: ExportedBackbone, b: ExportedBackbone, images: ImageOptions,
             progress: Progress | None) -> AffineMap:
        """:func:`~affeq_rt.method.fit.fit` of the pair on ``data``."""
        or_silent(progress).step(f"fitting {a.name}->{b.name} on {self.data} ({self.method})")
        return fit(str(self.data), [a.name, b.name], self.method, options=self.options,
                   images=images, progress=progress).maps[a.name, b.name]

    def record(self) -> dict[str, Any]:
        """The image folder."""
        return {"maps_file": None, "fit_on": str(self.data)}


class DataFree:
    """The data-free logit-pinv map (:data:`DATA_FREE`), from the two classifiers alone."""

    def check(self, a: BackboneSpec, b: BackboneSpec) -> None:
        """Nothing to refuse: every pair has one."""

    def make(self, a: ExportedBackbone, b: ExportedBackbone, images: ImageOptions,  # noqa: ARG002
             progress: Progress | None) -> AffineMap:  # noqa: ARG002
        """``fit(method="logit-pinv")`` on no rows, with the two exports' heads."""
        no_rows = {e.name: np.zeros((0, e.spec.feature_dim), np.float32) for e in (a, b)}
        heads = {e.name: e.classifier_head() for e in (a, b)}
        return fit(ArraySource(no_rows, heads=heads), method="logit-pinv").maps[a.name, b.name]

    def record(self) -> dict[str, Any]:
        """Neither a file nor images."""
        return {"maps_file": None, "fit_on": None}


def map_source(maps: MapSet | str | os.PathLike | None = None,
               fit_on: str | os.PathLike | FitOn | None = None) -> MapSource:
    """The map source that ``maps`` / ``fit_on`` name (a folder means ``FitOn(folder)``);
    neither: :class:`DataFree`; both: refused."""
    if maps is not None and fit_on is not None:
        raise AffeqError("both --maps and --fit-on given",
                         "pass a maps file, or an image folder to fit on, or neither")
    if maps is not None:
        return MapsFile(maps)
    if fit_on is not None:
        return fit_on if isinstance(fit_on, FitOn) else FitOn(fit_on)
    return DataFree()


def hybrid(src: str, dst: str, *, maps: MapSet | str | os.PathLike | None = None,
           fit_on: str | os.PathLike | FitOn | None = None,
           out: str | os.PathLike | None = None, options: HybridOptions = HybridOptions(),
           images: ImageOptions | None = None, progress: Progress | None = None) -> Path:
    """Export ``src`` and ``dst`` (or reuse their exports under ``images.export_root``), take the
    map from ``maps`` or make it (on the images ``fit_on``, a folder or a :class:`FitOn` naming
    the method, or data-free: :func:`map_source`), and write the verified hybrid
    (:func:`~affeq_rt.deploy.hybrid.build_hybrid`); return its path.

    Bad names, a taken ``out`` (default ``<src>_to_<dst>.onnx``; ``options.force`` replaces it),
    and a maps file without this pair are refused before any export or fit.
    """
    img = images or ImageOptions()
    sa, sb = get_spec(src), get_spec(dst)
    out_path = output_path(sa.name, sb.name, out, options)
    source = map_source(maps, fit_on)
    source.check(sa, sb)
    a = ensure_exported(sa, root=img.export_root, random_weights=img.random_weights,
                        progress=progress)
    b = ensure_exported(sb, root=img.export_root, random_weights=img.random_weights,
                        progress=progress)
    amap = source.make(a, b, img, progress)
    said = source.record()
    return build_hybrid(amap, a, b, out=out_path, options=options,
                        extra_meta={**said, "random_weights": img.random_weights},
                        verify_images=first_images(said["fit_on"]), progress=progress)
