"""From two network names to a written hybrid: export both, get the map, compose (build-hybrid).

:func:`hybrid` is what ``affeq-rt build-hybrid`` does. The map ``src->dst`` comes from a maps file
(``maps``), from a fit on an image folder (``fit_on``, through :func:`~affeq_rt.method.fit.fit`)
or, given neither, is the data-free logit-pinv map (:data:`DATA_FREE`), also through ``fit``;
:func:`~affeq_rt.deploy.hybrid.build_hybrid` then composes it with the two exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class FitOn:
    """Fit the hybrid's map on the image folder ``data`` with ``method`` (and ``options``);
    ``hybrid(..., fit_on="photos/")`` is ``FitOn("photos/")``."""

    data: str | os.PathLike
    method: str = "auto"
    options: FitOptions | None = None


def _fit_on(fit_on: str | os.PathLike | FitOn | None) -> FitOn | None:
    return fit_on if fit_on is None or isinstance(fit_on, FitOn) else FitOn(fit_on)


def given_map(src: BackboneSpec, dst: BackboneSpec,
              maps: MapSet | str | os.PathLike | None = None,
              fit_on: str | os.PathLike | FitOn | None = None) -> AffineMap | None:
    """The map src→dst of ``maps`` (a maps file or MapSet), checked against both networks, or
    None when it is to be made (``fit_on``, or neither); every refusal before any export."""
    fit_on = _fit_on(fit_on)
    if maps is not None and fit_on is not None:
        raise AffeqError("both --maps and --fit-on given",
                         "pass a maps file, or an image folder to fit on, or neither")
    if fit_on is not None and not Path(fit_on.data).is_dir():
        raise AffeqError(f"--fit-on {fit_on.data} is not a folder", "pass a folder of images")
    if maps is None:
        return None
    amap = (maps if isinstance(maps, MapSet) else load_maps(maps))[src.name, dst.name]
    check_map(amap, src, dst)
    return amap


def hybrid_map(a: ExportedBackbone, b: ExportedBackbone, fit_on: FitOn | None = None,
               images: ImageOptions | None = None, progress: Progress | None = None) -> AffineMap:
    """A new map a→b: fitted as ``fit_on`` says (with ``images``) or, without it, the data-free
    logit-pinv map from the two classifiers alone."""
    if fit_on is not None:
        or_silent(progress).step(f"fitting {a.name}->{b.name} on {fit_on.data} "
                                 f"({fit_on.method})")
        return fit(str(fit_on.data), [a.name, b.name], fit_on.method, options=fit_on.options,
                   images=images, progress=progress).maps[a.name, b.name]
    no_rows = {e.name: np.zeros((0, e.spec.feature_dim), np.float32) for e in (a, b)}
    heads = {e.name: e.classifier_head() for e in (a, b)}
    return fit(ArraySource(no_rows, heads=heads), method="logit-pinv").maps[a.name, b.name]


def hybrid(src: str, dst: str, *, maps: MapSet | str | os.PathLike | None = None,
           fit_on: str | os.PathLike | FitOn | None = None,
           out: str | os.PathLike | None = None, options: HybridOptions = HybridOptions(),
           images: ImageOptions | None = None, progress: Progress | None = None) -> Path:
    """Export ``src`` and ``dst`` (or reuse their exports under ``images.export_root``), take the
    map from ``maps`` or make it (:func:`hybrid_map`: on the images ``fit_on``, a folder or a
    :class:`FitOn` naming the method, or data-free), and write the verified hybrid
    (:func:`~affeq_rt.deploy.hybrid.build_hybrid`); return its path.

    Bad names, a taken ``out`` (default ``<src>_to_<dst>.onnx``; ``options.force`` replaces it),
    and a maps file without this pair are refused before any export or fit.
    """
    img = images or ImageOptions()
    plan = _fit_on(fit_on)
    sa, sb = get_spec(src), get_spec(dst)
    out_path = output_path(sa.name, sb.name, out, options)
    amap = given_map(sa, sb, maps, plan)
    a = ensure_exported(sa.name, root=img.export_root, random_weights=img.random_weights,
                        progress=progress)
    b = ensure_exported(sb.name, root=img.export_root, random_weights=img.random_weights,
                        progress=progress)
    if amap is None:
        amap = hybrid_map(a, b, plan, img, progress)
    extra = {"maps_file": None if maps is None else str(getattr(maps, "path", maps)),
             "fit_on": None if plan is None else str(plan.data),
             "random_weights": img.random_weights}
    return build_hybrid(amap, a, b, out=out_path, options=options, extra_meta=extra,
                        verify_images=first_images(None if plan is None else plan.data),
                        progress=progress)
