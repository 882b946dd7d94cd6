"""Today's fit (every method, the curve, similarity), evaluate and similarity against the outputs of
the code before the pass engine (issue 21), kept in tests/data/golden.npz (tests/data/golden.py).

Bounds, from the arithmetic: the engine feeds the same rows in the same order to the same float64
Gram code, so on the machine that made the file the results are bit-identical. On another CPU the
BLAS kernels may sum in another order: each Gram entry then moves by at most γ_m·Σ|y_i||y_j|
(m ≤ 8192 rows, γ_m ≈ 1.8e-12 relative; core/gram.py), and the solves amplify that by the
condition number of the centred source block (here ≤ ~1e3: 64 digit pixels / 16 with rank-deficient
edges removed by the eigenvalue cut-off), so maps agree to ~1e-8 relative before their float32
rounding (2⁻²⁴ ≈ 6e-8): ``rtol=1e-6, atol=1e-6`` allows a few float32 ulps at the entries' scale
(|W| ≲ 10). Integer outputs (predictions, hits) must be equal; percentages are ratios of integers.
Adam runs float32 torch on the CPU, whose reductions may differ between kernels: its maps get the
looser bound 1e-4 (20 steps of lr 0.1 on unit-normalised losses, each step's rounding ≲ 1e-6).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import golden  # noqa: E402  (tests/data is on sys.path, as in test_data.py)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def now() -> dict[str, np.ndarray]:
    return golden.compute()


@pytest.fixture(scope="module")
def before() -> dict[str, np.ndarray]:
    with np.load(golden.GOLDEN) as z:
        return {k: z[k] for k in z.files}


def test_same_outputs_as_before_the_engine(now, before) -> None:
    keys = set(before) - {"meta"}
    added = {k for k in now if k.endswith("/mutual_knn")}  # issue 22: a measure of rows, new
    assert keys == set(now) - added, sorted(keys ^ (set(now) - added))
    for k in sorted(keys):
        a, b = now[k], before[k]
        if k == "curve":
            ca, cb = json.loads(bytes(a)), json.loads(bytes(b))
            assert (ca["models"], ca["measure"]) == (cb["models"], cb["measure"])
            for pa, pb in zip(ca["points"], cb["points"], strict=True):
                assert pa["images"] == pb["images"]
                for m in ("r2", "score"):
                    np.testing.assert_allclose(np.array(pa[m], float), np.array(pb[m], float),
                                               rtol=1e-9, atol=1e-9, err_msg=k)
        elif a.dtype.kind in "iub" or k.startswith("evaluate/"):
            np.testing.assert_array_equal(a, b, err_msg=k)
        else:
            tol = 1e-4 if "/adam/" in k else 1e-6
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=k)
