"""The paper's overlap analysis (Fig. 5): which images A, B and the hybrid A→B get right."""

from __future__ import annotations

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.method.results import REGIONS, EvalTable, Overlap

# Bit code of an image: 1 = A right, 2 = B right, 4 = hybrid right.
_CODES = {"none": 0, "A": 1, "B": 2, "AB": 3, "H": 4, "AH": 5, "BH": 6, "ABH": 7}


def overlap(table: EvalTable, a: str, b: str) -> Overlap:
    """Fig. 5 of the paper for hybrid a→b: the 7 regions of {A right, B right, hybrid right}."""
    if a == b:
        raise AffeqError(f"overlap needs two different networks, got {a} twice", "pick a pair")
    ra, rb, rh = table.hits(a, a), table.hits(b, b), table.hits(a, b)
    code = ra.astype(np.int8) | (rb.astype(np.int8) << 1) | (rh.astype(np.int8) << 2)
    counts = np.bincount(code, minlength=8)
    return Overlap(a=a, b=b, n=table.n, regions={r: int(counts[_CODES[r]]) for r in REGIONS})


def default_overlap_pairs(table: EvalTable, limit: int = 2) -> list[tuple[str, str]]:
    """The paper's choice: the two most accurate networks, both directions."""
    if not table.labelled or len(table.models) < 2:
        return []
    order = np.argsort(-np.diag(table.top1), kind="stable")
    a, b = table.models[order[0]], table.models[order[1]]
    return [(a, b), (b, a)][:limit]
