"""Near-duplicate images (crops, flips, re-encodings of one photo) found from the networks'
features, so that the hold-out, the cross-validation folds and the curve keep them on one side
(issue 22).

A held-out figure is only honest when no view of a held-out photo was fitted on. File names
(``NAME__VIEW``, ``rows.group_key``) are one way to say which images belong together; this module
finds the rest from what the fit reads anyway: each image gets a small **signature** (its joint
features, each network's block scaled to unit length, randomly projected to
:data:`SIGNATURE_DIMS` dimensions), signatures are centred over the fit's images, and two images
whose centred cosine similarity reaches :data:`THRESHOLD` are linked; the connected components
(single linkage), joined with the explicit groups, are the groups.

Where the signatures come from (the hold-out mask is needed before the Gram pass):

* arrays and feature stores: from the addressable rows before the pass (a read of stored features,
  no image is decoded);
* image folders with a rows method (prior-ridge/prior-pca, what ``auto`` picks for few data): from
  the rows the pass keeps in memory, before the method solves (the mask and the folds use them);
* image folders with a Gram method: the pass keeps every image's signature (:class:`Signatures`
  reducer); the Gram's split was drawn before, so the groups cannot move it. The quality gate then
  scores only held-out images with no near-duplicate in training, and the summary says how many
  held-out images had one (the R² on the held-out Gram includes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SIGNATURE_DIMS = 512
# Centred cosine at or above which two images are near-duplicates. Measured on real ImageNet
# weights (efficientnet_lite0 + mobilenet_v2; bench/dedup_threshold.py, docs/BENCHMARKS.md): views
# (random crops of 8–100 % of the area, half flipped, re-encoded) of 15 photos link into exactly
# the 15 photos for thresholds 0.4–0.6; two different photos' largest similarity was 0.397.
THRESHOLD = 0.5
# Features that separate classes rather than photos (a 10-class network's, or low-dimensional ones
# where distinct rows reach 0.5 by chance: cosine sd 1/√d) link whole classes: on the digits
# miniature one group takes all 1198 images. Such a result is ignored (groups from file names
# only) when one group holds more than this share of the images.
REJECT_SHARE = 0.25
MAX_IMAGES = 20000  # pairwise similarities are n² / 2 products of SIGNATURE_DIMS: above, skipped
BLOCK = 2048  # rows per block of the pairwise products
PROJECTION_SEED = 20260522  # the projection is fixed: the same images give the same groups


def projection(width: int, dims: int = SIGNATURE_DIMS) -> np.ndarray | None:
    """The random projection [width, dims] (Gaussian, seeded, N(0, 1/dims) entries), or None when
    the joint row is no wider than ``dims`` (then the signature is the scaled row itself).

    With u, v unit vectors of cosine c, the cosine of Pu and Pv has standard deviation about
    (1 − c²)/√dims (Johnson–Lindenstrauss): ≤ 0.034 at dims 512 for c ≥ 0.5, ≤ 0.045 anywhere.
    """
    if width <= dims:
        return None
    rng = np.random.default_rng(PROJECTION_SEED)
    return (rng.standard_normal((width, dims)) / np.sqrt(dims)).astype(np.float32)


def signatures(x: np.ndarray, slices: Mapping[str, slice], proj: np.ndarray | None) -> np.ndarray:
    """Signatures [m, dims] float32 of joint rows ``x`` [m, D]: each network's block at unit
    length (a block of zeros or non-finite values stays zero), then projected."""
    u = np.zeros(x.shape, np.float32)
    for s in slices.values():
        b = np.asarray(x[:, s], np.float32)
        norm = np.linalg.norm(b, axis=1, keepdims=True)
        ok = np.isfinite(norm[:, 0]) & (norm[:, 0] > 0)
        u[ok, s] = b[ok] / norm[ok]
    return u if proj is None else u @ proj


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label [n] (the smallest member) of the graph with edges (i, j)."""
    lab = np.arange(n)
    while i.size:
        lo = np.minimum(lab[i], lab[j])
        new = lab.copy()
        np.minimum.at(new, i, lo)
        np.minimum.at(new, j, lo)
        new = new[new]  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    return lab


def near_pairs(sig: np.ndarray, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) whose centred cosine similarity is ≥ ``threshold``. Centred and scaled in
    float64, multiplied in float32: a product of unit vectors is then off by ≤ dims·2⁻²⁴ ≈ 3e-5,
    nothing beside the 0.1 between the threshold and the largest similarity of distinct photos."""
    z = np.asarray(sig, np.float64)
    if z.shape[0] < 2:  # no pair (a data-free fit has no rows: no mean to take either)
        return (np.zeros(0, int),) * 2
    z = z - z.mean(0)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0).astype(np.float32)
    ii, jj = [], []
    for a in range(0, z.shape[0], BLOCK):
        r, c = np.nonzero(z[a:a + BLOCK] @ z[a:].T >= threshold)
        keep = c > r  # each pair once, no self-pairs
        ii.append(r[keep] + a)
        jj.append(c[keep] + a)
    return (np.concatenate(ii), np.concatenate(jj)) if ii else (np.zeros(0, int),) * 2


@dataclass
class Found:
    """What detection found: groups of ≥ 2 images, the images they cover, and how it ran."""

    groups: int = 0
    images: int = 0
    largest: int = 0
    checked: int = 0  # images whose signatures were compared
    how: str = "off"  # off | features | pass (images, Gram) | skipped | rejected
    leaked: int = 0  # Gram on images: held-out images with a near-duplicate in training

    def line(self) -> str:
        """One line for the fit summary."""
        if self.how == "off":
            return "near-duplicate detection off (--no-dedup): groups from file names only"
        if self.how == "skipped":
            return (f"near-duplicate detection skipped: {self.checked} images > {MAX_IMAGES} "
                    "(groups from file names only; use --max-images or name views NAME__VIEW)")
        if self.how == "rejected":
            return (f"near-duplicate detection ignored: the networks' features put {self.largest} "
                    f"of {self.checked} images in one group (they separate classes, not photos); "
                    "groups from file names only (name views NAME__VIEW)")
        text = (f"near-duplicates: found {self.groups} groups covering {self.images} of "
                f"{self.checked} images (largest {self.largest}; centred cosine ≥ {THRESHOLD} "
                "of the networks' features); held out and cross-validated by group")
        if self.how == "pass":
            text += (f"; the hold-out was drawn before the pass: {self.leaked} held-out images "
                     "have a near-duplicate in training, left out of the agreement figures "
                     "(the held-out R² includes them)")
        return text

    def meta(self) -> dict[str, Any]:
        """The maps file's ``near_duplicates`` entry."""
        return {"how": self.how, "groups": self.groups, "images": self.images,
                "largest": self.largest, "checked": self.checked, "threshold": THRESHOLD,
                "signature_dims": SIGNATURE_DIMS, "leaked": self.leaked}


def combine(n: int, explicit: np.ndarray | None, i: np.ndarray, j: np.ndarray
            ) -> tuple[np.ndarray | None, Found]:
    """Group ids [n] (first-appearance order) joining ``explicit`` ids with the pairs (i, j), and
    what the pairs found; None when every image is its own group."""
    found = _count(_components(n, i, j))
    if explicit is not None:  # link each image to the first of its explicit group
        first = np.unique(explicit, return_index=True)[1][np.asarray(explicit)]
        i, j = np.concatenate([i, np.arange(n)]), np.concatenate([j, first])
    lab = _components(n, i, j)
    _, ids, sizes = np.unique(lab, return_inverse=True, return_counts=True)
    if sizes.max(initial=1) <= 1:
        return None, found
    order = np.unique(ids, return_index=True)[1]  # renumber in order of first appearance
    rank = np.empty(order.size, np.int64)
    rank[np.argsort(order)] = np.arange(order.size)
    return rank[ids], found


def _count(lab: np.ndarray) -> Found:
    sizes = np.unique(lab, return_counts=True)[1]
    multi = sizes[sizes > 1]
    return Found(int(multi.size), int(multi.sum()), int(multi.max(initial=0)), int(lab.size),
                 "features")


def detect(sig: np.ndarray, explicit: np.ndarray | None, n: int | None = None,
           index: np.ndarray | None = None) -> tuple[np.ndarray | None, Found]:
    """Groups over ``n`` samples from signatures of the samples ``index`` (default: all, in
    order), joined with ``explicit``; samples without a signature keep their explicit group."""
    m = sig.shape[0]
    n = m if n is None else n
    if m > MAX_IMAGES:
        return explicit, Found(checked=m, how="skipped")
    i, j = near_pairs(sig)
    if index is not None:
        i, j = index[i], index[j]
    groups, found = combine(n, explicit, i, j)
    found.checked = m
    if found.largest > REJECT_SHARE * m:
        return explicit, Found(found.groups, found.images, found.largest, m, "rejected")
    return groups, found


def array_signatures(arrays: Mapping[str, Any], slices: Mapping[str, slice], n: int,
                     chunk: int = 4096) -> np.ndarray:
    """Signatures of addressable rows (arrays, a feature store), read in chunks."""
    width = max(s.stop for s in slices.values())
    proj = projection(width)
    out = []
    for a in range(0, n, chunk):
        x = np.concatenate([np.asarray(arrays[name][a:a + chunk], np.float32)
                            for name in slices], axis=1)
        out.append(signatures(x, slices, proj))
    return np.concatenate(out) if out else np.zeros((0, SIGNATURE_DIMS), np.float32)
