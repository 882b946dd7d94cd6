"""Which images a fit holds out together: file-name groups joined with detected near-duplicates.

``fit`` calls :func:`fit_groups` before the pass (arrays and stores: signatures from the stored
rows), :func:`pass_reducers` for what the pass must gather (image folders with a Gram method: every
image's signature), and :func:`after_pass` before the method solves (image folders: the groups from
the pass's rows or signatures). The numerics are ``method.dedup``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from affeq_rt.engine.reducer import Reducer
from affeq_rt.method import dedup
from affeq_rt.method.methods import FitContext, holdout_mask
from affeq_rt.method.reducers import Signatures
from affeq_rt.method.rows import source_groups


def fit_groups(rows: Any, slices: Mapping[str, slice], on: bool
               ) -> tuple[np.ndarray | None, dedup.Found]:
    """Group ids [n] before the pass (None: every sample its own group) and what detection found:
    from addressable rows now; for image folders later (``how`` = ``rows``/``pass``, set by
    :func:`pass_reducers`)."""
    explicit = source_groups(rows)
    arrays = rows.arrays()
    if not on:
        return explicit, dedup.Found(how="off")
    if int(rows.n) > dedup.MAX_IMAGES:  # not even read: too many pairs to compare
        return explicit, dedup.Found(checked=int(rows.n), how="skipped")
    if arrays is None:
        return explicit, dedup.Found(how="later")
    sig = dedup.array_signatures(arrays, slices, int(rows.n))
    return dedup.detect(sig, explicit)


def pass_reducers(ctx: FitContext, needs: str) -> dict[str, Reducer]:
    """Image folders: the rows methods detect from the rows they keep; a Gram method gets every
    image's signature."""
    if ctx.found.how != "later":
        return {}
    if needs == "rows":
        ctx.found.how = "rows"
        return {}
    if needs == "gram":
        ctx.found.how = "pass"
        return {"signatures": Signatures(ctx.slices)}
    ctx.found.how = "off"  # no rows read (heads only): nothing to hold out
    return {}


def after_pass(ctx: FitContext, red: Mapping[str, Any]) -> None:
    """Image folders: the groups from this pass. A rows method's mask and folds follow them; after
    a Gram pass (split drawn before) the held-out images with a near-duplicate in training are
    counted and dropped from the rows the quality gate scores."""
    how, n = ctx.found.how, int(ctx.rows.n)
    if how == "rows":
        x, idx = red["rows"].all()
        sig = dedup.signatures(x, ctx.slices, dedup.projection(x.shape[1]))
        ctx.groups, ctx.found = dedup.detect(sig, ctx.groups, n, idx)
        o = ctx.options
        ctx.mask = holdout_mask(n, o.holdout, o.seed, ctx.groups)
    elif how == "pass":
        sig, idx = red["signatures"].rows()
        groups, ctx.found = dedup.detect(sig, ctx.groups, n, idx)
        if ctx.found.how == "features":  # found, but the split was drawn before the pass
            ctx.found.how = "pass"
            leaked = leaked_samples(groups, ctx.mask)
            ctx.found.leaked = int(leaked.sum())
            if "heldout" in red:
                red["heldout"].drop(leaked)


def leaked_samples(groups: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """bool [n]: held-out samples whose group has a training sample."""
    if groups is None:
        return np.zeros(mask.shape, bool)
    trained = np.zeros(int(groups.max()) + 1, bool)
    trained[groups[~mask]] = True
    return mask & trained[groups]


def summary_lines(meta: Mapping[str, Any]) -> list[str]:
    """The fit summary's near-duplicate line (none for maps files without the entry)."""
    nd = meta.get("near_duplicates")
    return [] if not nd else [dedup.Found(**{k: nd[k] for k in (
        "groups", "images", "largest", "checked", "how", "leaked")}).line()]
