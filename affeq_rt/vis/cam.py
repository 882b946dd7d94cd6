"""Class activation maps (Zhou et al. 2016), exact through an affine map: what a hybrid looks at.

For a network whose classifier follows global average pooling, logits = W·mean_xy f(x, y) + b,
so CAM_c(x, y) = Σ_k W[c, k] f_k(x, y) averages over positions to logit_c − b_c exactly. The
hybrid C_B(M·F_A) has the folded head (W_B·M, W_B·m + b_B) on A's pooled features, so its CAM is
Σ_k (W_B M)[c, k] f_{A,k}(x, y), on A's spatial grid, with the same identity against the hybrid's
logits. ``cam()`` computes A's own, B's own and the hybrid's maps for the top classes of each
image, the correlation of the hybrid's map with each parent's, and writes PNGs + one HTML page.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.labels import softmax
from affeq_rt.data.preprocess import crop, load_image, preprocess
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import write_json_atomic
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import MapSet
from affeq_rt.method.extract import ImageOptions
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.spatial import SpatialModel, open_spatial
from affeq_rt.progress import Progress, or_silent
from affeq_rt.vis.common import (
    as_mapset,
    crop_geometry,
    hybrid_head,
    label_names,
    pair_map,
    pearson,
    resample,
    resolve_export,
)
from affeq_rt.vis.figures import write_cam_outputs
from affeq_rt.vis.results import CamImage, CamResult

CORR_GRID = 56  # maps are compared on a 56×56 grid over the part of the image both crops see


def class_activation_maps(spatial: np.ndarray, weight: np.ndarray,
                          classes: Sequence[int] | None = None) -> np.ndarray:
    """CAM_c(x, y) = Σ_k W[c, k] f_k(x, y) in float64: ``spatial`` [C, h, w] or [N, C, h, w],
    ``weight`` [K, C] → [k, h, w] (or [N, k, h, w]) for ``classes`` (default all K)."""
    w = np.asarray(weight, np.float64)
    if classes is not None:
        w = w[list(classes)]
    f = np.asarray(spatial, np.float64)
    if f.shape[-3] != w.shape[1]:
        raise AffeqError(f"spatial map has {f.shape[-3]} channels, the head {w.shape[1]} inputs",
                         "use the head of the network (or hybrid) the map comes from")
    return np.einsum("kc,...chw->...khw", w, f)


@dataclass
class CamNetwork:
    """One network opened for CAM: its export, ``spatial.onnx`` session and classifier head."""

    export: ExportedBackbone
    spatial: SpatialModel
    head: Head

    @property
    def name(self) -> str:
        """Canonical name."""
        return self.export.name

    @property
    def spec(self) -> Any:
        """Its BackboneSpec."""
        return self.export.spec


def open_cam_network(target: str | os.PathLike, provider: str = "auto",
                     export_root: str | os.PathLike | None = None,
                     random_weights: bool = False) -> CamNetwork:
    """Resolve, export if needed and open a network's spatial map; AffeqError (one line) for a
    network whose classifier does not follow global average pooling."""
    exp = resolve_export(target, export_root, random_weights)
    return CamNetwork(exp, open_spatial(exp, provider), exp.classifier_head())


def _peaks(maps: np.ndarray, size: tuple[int, int], spec: Any) -> list[tuple[float, float]]:
    """Each map's argmax cell centre in original image pixels."""
    left, top, side = crop_geometry(size, spec)
    out = []
    for m in maps:
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        out.append((left + (j + 0.5) / m.shape[1] * side, top + (i + 0.5) / m.shape[0] * side))
    return out


_Heads = dict[str, tuple[np.ndarray, np.ndarray]]  # role -> float64 (W, b)


def _open_roles(src: str | os.PathLike, dst: str | os.PathLike | None,
                maps: str | os.PathLike | MapSet | None, opt: ImageOptions
                ) -> tuple[dict[str, CamNetwork], dict[str, str], _Heads]:
    """The networks by role (``src``, ``dst``), the roles' labels and float64 heads (``src``,
    ``dst``, then ``hybrid`` = B's head folded into the map)."""
    a = open_cam_network(src, opt.provider, opt.export_root, opt.random_weights)
    nets = {"src": a}
    labels = {"src": a.name}
    hybrid: _Heads = {}
    if dst is not None:
        b = open_cam_network(dst, opt.provider, opt.export_root, opt.random_weights)
        if b.head.num_classes != a.head.num_classes:
            raise AffeqError(f"{a.name} has {a.head.num_classes} classes and {b.name} "
                             f"{b.head.num_classes}", "CAM compares networks over one label set")
        mset = as_mapset(maps)  # type: ignore[arg-type]
        hh = hybrid_head(pair_map(mset, a.name, b.name, a.head.dim, b.head.dim), b.head)
        hybrid["hybrid"] = (hh.weight, hh.bias)
        nets["dst"] = b
        labels.update(dst=b.name, hybrid=f"{a.name}→{b.name}")
    heads = {r: (np.asarray(n.head.weight, np.float64), np.asarray(n.head.bias, np.float64))
             for r, n in nets.items()}
    return nets, labels, {**heads, **hybrid}


def _correlations(size: tuple[int, int], cams: dict[str, np.ndarray],
                  specs: dict[str, Any]) -> dict[str, float]:
    """Pearson r of the hybrid's top-class map with each parent's, on a common grid over the
    part of the image both crops see."""
    fr = {r: crop_geometry(size, specs[r])[2] for r in ("src", "dst")}
    common = min(fr.values())
    grid = {r: resample(cams[r][0], CORR_GRID, common / fr["src" if r == "hybrid" else r])
            for r in ("src", "dst", "hybrid")}
    return {r: pearson(grid["hybrid"], grid[r]) for r in ("src", "dst")}


def _cam_image(path: str, img: Any, nets: dict[str, CamNetwork], heads: _Heads, top: int,
               names_all: Sequence[str]) -> CamImage:
    """Every role's CAMs of one image for the lead role's top classes."""
    spatial: dict[str, np.ndarray] = {}
    crops: dict[str, np.ndarray] = {}
    for role, net in nets.items():
        sp, _ = net.spatial.run(preprocess(img, net.spec)[None])
        spatial[role] = sp[0]
        crops[role] = crop(img, net.spec)
    hybrid = "hybrid" in heads
    if hybrid:
        spatial["hybrid"], crops["hybrid"] = spatial["src"], crops["src"]
    logits = {r: w @ spatial[r].astype(np.float64).mean(axis=(1, 2)) + bb
              for r, (w, bb) in heads.items()}
    probs = {r: softmax(z) for r, z in logits.items()}
    lead = "hybrid" if hybrid else "src"
    classes = [int(c) for c in np.argsort(-probs[lead], kind="stable")[:max(1, top)]]
    cams = {r: class_activation_maps(spatial[r], heads[r][0], classes) for r in heads}
    specs = {r: nets["src" if r == "hybrid" else r].spec for r in heads}
    return CamImage(
        path=path, size=img.size, classes=classes, names=[names_all[c] for c in classes],
        maps=cams, probs={r: [float(probs[r][c]) for c in classes] for r in cams},
        top1={r: int(np.argmax(probs[r])) for r in cams},
        peaks={r: _peaks(cams[r], img.size, specs[r]) for r in cams},
        correlation=_correlations(img.size, cams, specs) if hybrid else {}, crops=crops)


def cam(images: Sequence[str | os.PathLike], src: str | os.PathLike,
        dst: str | os.PathLike | None = None, maps: str | os.PathLike | MapSet | None = None, *,
        out: str | os.PathLike | None = None, top: int = 3, options: ImageOptions | None = None,
        progress: Progress | None = None) -> CamResult:
    """CAMs of ``src`` (and of ``dst`` and the hybrid ``src → dst`` through ``maps``) for the
    top ``top`` classes of each image (the hybrid's when there is one); with ``out`` writes
    ``<stem>.png`` per image, ``cam.html`` and ``cam.json``. Images are read first: an
    unreadable one raises AffeqError before any network runs. ``options``: its provider, export
    root and random weights are used (each image is read with the networks' exact transform)."""
    if not images:
        raise AffeqError("no images given", "pass one or more image files")
    if (dst is None) != (maps is None):
        raise AffeqError("--dst and --maps go together", "pass both (the hybrid), or neither")
    decoded = [(str(p), load_image(p)) for p in images]
    prog = or_silent(progress)
    prog.step(f"opening {src}" + (f" and {dst}" if dst else ""))
    nets, labels, heads = _open_roles(src, dst, maps, options or ImageOptions())
    names_all = label_names(nets["src"].head.num_classes)
    results = []
    prog.start("class activation maps", total=len(decoded), unit="img")
    for path, img in decoded:
        results.append(_cam_image(path, img, nets, heads, top, names_all))
        prog.advance()
    prog.done()
    res = CamResult(labels, results)
    if out is not None:
        res.files = write_cam_outputs(res, Path(out))
        write_json_atomic(Path(out) / "cam.json",
                          {"labels": labels, "images": [i.to_dict() for i in results]})
        res.files["json"] = Path(out) / "cam.json"
    return res
