"""Golden outputs of the fit/evaluate/similarity passes, computed by the code BEFORE the pass engine
(issue 21) and kept in ``tests/data/golden.npz``; ``tests/test_golden.py`` recomputes them with
today's code and compares.

Inputs are fully deterministic and CPU-independent: three "networks" built from sklearn's digits
with integer-formula projections (no random generator), ten-class heads from class means. The
outputs are every fit method's maps (with the curve and the similarity table of the OLS fit), the
evaluation table under the OLS maps, and ``similarity()`` over all rows. Regenerate only on purpose:
``python tests/data/golden.py`` (it says which commit produced the file in ``meta``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).with_name("golden.npz")
METHODS = ("ols", "ridge", "prior-ridge", "prior-pca", "logit-pinv", "naive", "adam")
CURVE = "300,600"


def inputs() -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
    """(features {a, b, c} float32, heads {name: Head}, labels int64) from the digits."""
    from sklearn.datasets import load_digits

    from affeq_rt.io.heads import Head

    d = load_digits()
    x = np.asarray(d.data, np.float64) / 16.0  # [1797, 64], exact
    y = np.asarray(d.target, np.int64)
    i = np.arange(64)[:, None]
    p = (((i * 7 + np.arange(32)[None, :] * 13) % 11) - 5) / 10.0
    q = (((i * 5 + np.arange(48)[None, :] * 3) % 7) - 3) / 6.0
    feats = {"a": x, "b": np.tanh(x @ p), "c": np.maximum(x @ q, 0.0)}
    feats = {k: np.ascontiguousarray(v, np.float32) for k, v in feats.items()}
    heads = {}
    for k, f in feats.items():
        means = np.stack([f[y == c].mean(0) for c in range(10)]).astype(np.float32)
        heads[k] = Head.from_raw(means, -0.5 * (means * means).sum(1))
    return feats, heads, y


def compute() -> dict[str, np.ndarray]:
    """Every golden output as flat arrays (``key -> array``)."""
    from affeq_rt.io.store import ArrayStore
    from affeq_rt.method.evaluate import evaluate
    from affeq_rt.method.fit import FitOptions, fit
    from affeq_rt.method.rows import ArraySource
    from affeq_rt.method.similarity import similarity

    feats, heads, y = inputs()
    out: dict[str, np.ndarray] = {}
    for method in METHODS:
        src = ArraySource(feats, heads=heads, labels=y)
        opt = FitOptions(curve=CURVE if method == "ols" else "off", similarity=method == "ols",
                         adam_iterations=20, device="cpu")
        res = fit(src, method=method, options=opt)
        for m in res.maps.values():
            out[f"fit/{method}/{m.key}/weight"] = m.weight
            out[f"fit/{method}/{m.key}/bias"] = m.bias
            for s in ("r2_holdout", "agree_holdout", "top1_holdout"):
                v = m.stats.get(s)
                if isinstance(v, (int, float)):
                    out[f"fit/{method}/{m.key}/{s}"] = np.float64(v)
        if method == "ols":
            out["curve"] = np.frombuffer(json.dumps(res.curve.to_dict(), sort_keys=True)
                                         .encode(), np.uint8)
            for k, v in res.similarity.measures().items():
                out[f"fit-similarity/{k}"] = np.asarray(v, np.float64)
            store = ArrayStore(feats, {k: (h.weight, h.bias) for k, h in heads.items()}, y)
            t = evaluate(store, res.maps, device="cpu")
            for k in ("top1", "top5", "agree", "pred"):
                out[f"evaluate/{k}"] = np.asarray(getattr(t, k))
    sim = similarity(feats, device="cpu")
    for k, v in sim.measures().items():
        out[f"similarity/{k}"] = np.asarray(v, np.float64)
    return out


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = compute()
    out["meta"] = np.frombuffer(json.dumps({"commit": commit}).encode(), np.uint8)
    np.savez_compressed(GOLDEN, **out)
    print(f"wrote {GOLDEN}: {len(out)} arrays from commit {commit}", file=sys.stderr)


if __name__ == "__main__":
    main()
