"""Map solvers: OLS and ridge from Gram statistics, logit pseudo-inverse from heads, Adam, naive,
and the few-data estimators that shrink toward the logit-pinv map (prior-ridge, prior-pca).

Gram-based solvers read any *moments* object with ``n``, ``mean() -> [D]`` and
``scatter(rows=slice, cols=slice) -> [r, c]`` (centred Σ(x−μ)(x−μ)ᵀ, float64) — that is
``core.GramAccumulator`` over the concatenated features [F_1 … F_k]; a source/target is a slice of
that joint vector. Everything is float64. Rank-deficient systems (fewer images than dimensions,
dead features) use an eigenvalue cut-off (minimum-norm solution) and report it in the stats;
they never produce NaN.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head
from affeq_rt.progress import Progress, or_silent

PRIOR_METHODS = ("prior-ridge", "prior-pca")
# Eigenvalues of S_AA at or below rcond·λ_max count as null (numpy's convention: relative to the
# largest). The default follows the precision of the moments: the compiled Gram forms every product
# in float64 (``GramAccumulator.eps``), and eigh on float64 already blurs eigenvalues by
# ~d·eps64·λ_max, so rcond = d·eps (≈1.1e-13 for d = 512) keeps every direction float64 resolves.
# A negative eigenvalue measures the noise directly: up to NOISE_FACTOR·|λ_min| is null too.
NOISE_FACTOR = 4.0
EPS64 = float(np.finfo(np.float64).eps)


def default_rcond(dim: int, eps: float = EPS64) -> float:
    """Default relative eigenvalue cut-off of a d-dimensional source: d·eps (the moments' eps)."""
    return max(int(dim), 1) * float(eps)


class Moments(Protocol):
    """What the Gram solvers need (``core.GramAccumulator`` provides it).

    An optional ``eps`` attribute (unit roundoff of the products behind the moments) sets the
    default cut-off; without it the moments are taken to be float64.
    """

    n: int

    def mean(self) -> np.ndarray: ...

    def scatter(self, rows: slice, cols: slice) -> np.ndarray: ...


@dataclass
class SourceEig:
    """Eigendecomposition S_AA = V diag(lam) Vᵀ of one source, shared by all its targets."""

    vecs: np.ndarray
    lam: np.ndarray
    keep: np.ndarray  # bool: eigenvalues above the cut-off
    dead: int  # features with zero variance

    @property
    def rank(self) -> int:
        """Number of kept eigen-directions."""
        return int(self.keep.sum())


def source_eig(train: Moments, a: slice, rcond: float | None = None) -> SourceEig:
    """Eigendecompose the source block S_AA (symmetrised) and apply the relative cut-off.

    ``rcond`` (None: :func:`default_rcond` from the moments' ``eps``): eigenvalues at or below
    max(rcond·λ_max, NOISE_FACTOR·|most negative eigenvalue|) are null.
    """
    s = np.asarray(train.scatter(a, a), np.float64)
    s = 0.5 * (s + s.T)
    if rcond is None:
        rcond = default_rcond(s.shape[0], getattr(train, "eps", EPS64))
    if not (math.isfinite(rcond) and rcond >= 0):
        raise AffeqError(f"rcond must be a finite number >= 0, got {rcond}",
                         "pass e.g. rcond=1e-10, or None for the default")
    dead = int((np.diag(s) <= 0).sum())
    lam, vecs = np.linalg.eigh(s)
    top = float(lam[-1]) if lam.size else 0.0
    floor = max(rcond * top, NOISE_FACTOR * max(-float(lam[0]), 0.0)) if lam.size else 0.0
    keep = lam > floor if top > 0 else np.zeros_like(lam, bool)
    return SourceEig(vecs, lam, keep, dead)


def _fit_stats(w: np.ndarray, b: np.ndarray, m: Moments, a: slice, t: slice,
               ) -> tuple[float, float | None]:
    """Σ‖y − Wx − b‖² over the rows of ``m`` and the R² against ``m``'s own target mean, from
    Gram statistics only. Returns (sum of squared residuals, R²)."""
    n = int(m.n)
    mean = m.mean()
    s_aa, s_ab, s_bb = m.scatter(a, a), m.scatter(a, t), m.scatter(t, t)
    delta = mean[t] - w @ mean[a] - b
    ss_tot = float(np.trace(s_bb))
    ss = ss_tot - 2.0 * float(np.sum(w * s_ab.T)) + float(np.sum((w @ s_aa) * w)) \
        + n * float(delta @ delta)
    ss = max(ss, 0.0)
    r2 = 1.0 - ss / ss_tot if ss_tot > 0 else None  # constant target: R² undefined (not NaN)
    return ss, r2


def _common_stats(w: np.ndarray, b: np.ndarray, train: Moments, a: slice, t: slice,
                  holdout: Moments | None) -> dict[str, Any]:
    ss, r2 = _fit_stats(w, b, train, a, t)
    out: dict[str, Any] = {"images": int(train.n), "residual": ss / max(int(train.n), 1),
                           "r2_train": r2}
    if holdout is not None and int(holdout.n) > 0:
        hs, hr2 = _fit_stats(w, b, holdout, a, t)
        out.update(holdout_images=int(holdout.n), residual_holdout=hs / int(holdout.n),
                   r2_holdout=hr2)
    else:
        out.update(holdout_images=0, r2_holdout=None)
    return out


def _check_n(train: Moments) -> None:
    if int(train.n) < 2:
        raise AffeqError(f"a map needs at least 2 training images, got {int(train.n)}",
                         "use more images (--max-images) or a smaller --holdout")


def ols(train: Moments, a: slice, t: slice, holdout: Moments | None = None,
        eig: SourceEig | None = None, rcond: float | None = None
        ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Ordinary least squares (thesis eq. 5.1): W = S_BA S_AA⁺, b = μ_B − W μ_A.

    S_AA⁺ is the pseudo-inverse through the eigen cut-off ``rcond`` (see :func:`source_eig`;
    minimum norm when rank-deficient).
    """
    _check_n(train)
    eig = eig or source_eig(train, a, rcond)
    v = eig.vecs[:, eig.keep]
    inv = 1.0 / eig.lam[eig.keep]
    s_ba = train.scatter(t, a)
    w = ((s_ba @ v) * inv) @ v.T
    mu = train.mean()
    b = mu[t] - w @ mu[a]
    stats = _common_stats(w, b, train, a, t, holdout)
    stats.update(_rank_stats(eig, train))
    return w, b, stats


def _rank_stats(eig: SourceEig, train: Moments) -> dict[str, Any]:
    kept = eig.lam[eig.keep]
    d = eig.lam.size
    return {"rank": eig.rank, "source_dim": d, "dead_features": eig.dead,
            "rank_deficient": eig.rank < d,
            "condition": float(kept[-1] / kept[0]) if kept.size else None,
            "underdetermined": int(train.n) - 1 < d}


def ridge_lambdas(eig: SourceEig, count: int = 41) -> np.ndarray:
    """λ grid: 0 plus ``count`` values log-spaced over 1e-8…1e2 × the mean eigenvalue of S_AA."""
    scale = float(np.mean(np.clip(eig.lam, 0, None))) or 1.0
    return np.concatenate([[0.0], scale * np.logspace(-8, 2, count)])


def ridge(train: Moments, a: slice, t: slice, holdout: Moments | None,
          eig: SourceEig | None = None, lambdas: np.ndarray | None = None,
          rcond: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Ridge regression, W_λ = S_BA (S_AA + λI)⁻¹, with λ chosen by held-out residual.

    The whole λ path comes from one eigendecomposition S_AA = V Λ Vᵀ: with P = S_BA V,
    W_λ = P D_λ Vᵀ (D_λ = 1/(Λ+λ)), and the held-out residual of every λ is a cheap function of
    P, Vᵀ S_h V and Vᵀ S_h,AB (no refit per λ). Every λ (not only λ = 0) uses OLS's eigenvalue
    cut-off: directions below it are noise of the Gram, and dividing them by a small λ would
    amplify that noise (it dominates when there are fewer images than dimensions).
    """
    _check_n(train)
    if holdout is None or int(holdout.n) < 1:
        raise AffeqError("ridge needs held-out images to choose λ", "pass --holdout 0.1 (or more)")
    eig = eig or source_eig(train, a, rcond)
    v, lam = eig.vecs, eig.lam
    lambdas = ridge_lambdas(eig) if lambdas is None else np.asarray(lambdas, np.float64)
    mu, mu_h = train.mean(), holdout.mean()
    p = train.scatter(t, a) @ v  # [dB, dA]
    h = v.T @ holdout.scatter(a, a) @ v  # [dA, dA]
    q = v.T @ holdout.scatter(a, t)  # [dA, dB]
    c = np.einsum("ji,ij->i", p, q)  # tr(P D Q) = Σ_i D_i c_i
    g = p.T @ p
    hg = h * g  # tr(P D H D Pᵀ) = Dᵀ (H ⊙ PᵀP) D
    u = v.T @ (mu_h[a] - mu[a])
    e = mu_h[t] - mu[t]
    ss_bb = float(np.trace(holdout.scatter(t, t)))
    n_h = int(holdout.n)
    safe = np.where(eig.keep, lam, 1.0)

    def dvec_of(lmb: float) -> np.ndarray:
        """D_λ = 1/(Λ + λ) on the kept directions, 0 on the null ones."""
        return np.where(eig.keep, 1.0 / (safe + lmb), 0.0)

    path = []
    for lmb in lambdas:
        dvec = dvec_of(float(lmb))
        delta = e - p @ (dvec * u)
        ss = ss_bb - 2.0 * float(dvec @ c) + float(dvec @ hg @ dvec) + n_h * float(delta @ delta)
        path.append(max(ss, 0.0) / n_h)
    best = int(np.nanargmin(path))
    lmb = float(lambdas[best])
    dvec = dvec_of(lmb)
    w = (p * dvec) @ v.T
    b = mu[t] - w @ mu[a]
    stats = _common_stats(w, b, train, a, t, holdout)
    stats.update(_rank_stats(eig, train))
    stats.update({"lambda": lmb, "lambda_index": best,
                  "lambda_path": [float(x) for x in lambdas], "holdout_residual_path": path})
    return w, b, stats


_PINVS: dict[tuple[str, tuple[int, ...], float], tuple[np.ndarray, int]] = {}
_PINV_CACHE = 8  # heads remembered (an ImageNet head's pseudo-inverse: 10 MB in float64)


def head_pinv(w: np.ndarray, rcond: float = 1e-12) -> tuple[np.ndarray, int]:
    """Pseudo-inverse [d, K] (read-only) and rank of a head's weight [K, d] from one SVD
    (float64). The last few are remembered by the weight's bytes: a fit's quality gate, the
    logit-pinv map and the controls ask for the same heads' (a 1000×1280 SVD takes seconds)."""
    a = np.ascontiguousarray(w, np.float64)
    key = (hashlib.sha256(a.tobytes()).hexdigest(), a.shape, float(rcond))
    if key not in _PINVS:
        u, sv, vt = np.linalg.svd(a, full_matrices=False)
        keep = sv > rcond * (sv[0] if sv.size else 0.0)
        pinv = (vt[keep].T / sv[keep]) @ u[:, keep].T
        pinv.flags.writeable = False
        while len(_PINVS) >= _PINV_CACHE:
            _PINVS.pop(next(iter(_PINVS)))
        _PINVS[key] = (pinv, int(keep.sum()))
    return _PINVS[key]


def logit_pinv(head_src: Head, head_dst: Head, rcond: float = 1e-12,
               pinv_dst: tuple[np.ndarray, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Through the logits (thesis §5.5): M = W_B⁺ W_A, bias W_B⁺ (b_A − b_B).

    The heads score the same K classes in the same order (a TF-slim background row is stripped
    once, where heads are loaded: :class:`affeq_rt.io.heads.Head`).
    The map reproduces A's logits through B's head exactly when W_B has full row rank
    (K ≤ d_B); ``logits_exact`` says so. ``pinv_dst`` (from :func:`head_pinv` on B's weight)
    reuses B's SVD across sources.
    """
    wa, ba = (np.asarray(x, np.float64) for x in (head_src.weight, head_src.bias))
    wb, bb = (np.asarray(x, np.float64) for x in (head_dst.weight, head_dst.bias))
    if wa.shape[0] != wb.shape[0]:
        raise AffeqError(f"the heads score different numbers of classes ({wa.shape[0]} and "
                         f"{wb.shape[0]})", "map between networks with the same label set")
    k = wa.shape[0]
    pinv, rank = pinv_dst if pinv_dst is not None else head_pinv(wb, rcond)  # [dB, K]
    w = pinv @ wa
    b = pinv @ (ba - bb)
    recon = wb @ w  # equals wa when exact
    err = float(np.abs(recon - wa).max() / max(np.abs(wa).max(), 1e-30))
    return w, b, {"classes": k, "rank_dst_head": rank, "logits_exact": rank == k,
                  "logit_rel_error": err}


# ---------------------------------------------------------------------------------------------
# few-data estimators: a spectral correction to a prior map M₀ (the logit-pinv map)
#
# With centred source rows X = U S Vᵀ (S_AA = V Λ Vᵀ, Λ = S²) and centred target rows Y, every
# estimator here is a filter f on the eigen-directions of the source applied to the residual
# R = Y − X M₀ᵀ − 1b₀ᵀ (mean r̄ = μ_B − M₀μ_A − b₀), written around the source mean:
#   ŷ(x) = M₀x + b₀ + s·r̄ + ΔM (x − μ_A),   ΔM = (S_BA − M₀ S_AA) V diag(f) Vᵀ,
# i.e. M = M₀ + ΔM and b = b₀ + s·r̄ − ΔM μ_A.
#   prior-ridge: f = 1/(Λ + λ), s = n/(n + λ): the exact minimiser of
#       ‖(X − 1μ_Aᵀ) Mᵀ + 1cᵀ − Y‖² + λ‖M − M₀‖² + λ‖c − c₀‖²,  c₀ = M₀μ_A + b₀,
#     the intercept being shrunk like one more feature (constant 1): at λ → ∞ the map is the
#     prior exactly, b₀ included, and the path is continuous;
#   prior-pca:   f = 1/Λ on the k strongest directions, 0 elsewhere, s = 1 (OLS of the residual
#     on the k leading principal components, intercept included); k = 0 is the prior itself;
#   ridge toward zero is the same with M₀ = 0, b₀ = 0 and s = 1 (b = μ_B − M μ_A).


@dataclass
class RowSpectrum:
    """Thin eigendecomposition of one source's centred rows, from their SVD (n²d flops, which is
    what the few-data case affords: n ≲ d): S_AA = V diag(lam) Vᵀ on the kept directions."""

    mean: np.ndarray  # μ_A [d]
    vecs: np.ndarray  # V [d, r], columns by decreasing eigenvalue
    lam: np.ndarray  # [r] eigenvalues of S_AA (squared singular values), decreasing
    scores: np.ndarray  # X V = U S [n, r] (the rows' coordinates)
    dim: int  # d
    total: float  # tr(S_AA): the λ grid's scale

    @property
    def rank(self) -> int:
        """Kept directions."""
        return int(self.lam.size)


def row_spectrum(xa: np.ndarray, rcond: float | None = None) -> RowSpectrum:
    """SVD of the centred rows ``xa`` [n, d] (float64); singular directions with
    λ ≤ rcond·λ_max (default :func:`default_rcond`) are dropped (centring alone kills one)."""
    x = np.asarray(xa, np.float64)
    if x.shape[0] < 2:
        raise AffeqError(f"a map needs at least 2 training images, got {x.shape[0]}",
                         "use more images or a smaller --holdout")
    mu = x.mean(0)
    u, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
    lam = sv * sv
    rc = default_rcond(x.shape[1]) if rcond is None else rcond
    keep = lam > rc * (lam[0] if lam.size else 0.0) if lam.size and lam[0] > 0 else \
        np.zeros(lam.shape, bool)
    return RowSpectrum(mu, vt[keep].T, lam[keep], u[:, keep] * sv[keep], x.shape[1],
                       float(lam.sum()))


def ridge_filter(lam: np.ndarray, lmb: float) -> np.ndarray:
    """f = 1/(Λ + λ) (λ ≥ 0; the kept eigenvalues are > 0)."""
    return 1.0 / (lam + lmb)


def pca_filter(lam: np.ndarray, k: int) -> np.ndarray:
    """f = 1/Λ on the ``k`` strongest directions, 0 on the rest."""
    f = np.zeros_like(lam)
    f[:k] = 1.0 / lam[:k]
    return f


def residual_projection(spec: RowSpectrum, yb: np.ndarray, prior_w: np.ndarray | None
                        ) -> np.ndarray:
    """P_r = (S_BA − M₀ S_AA) V [d_B, r] from the rows (Yᶜᵀ U S − M₀ V Λ); M₀ = None is zero."""
    y = np.asarray(yb, np.float64)
    p = (y - y.mean(0)).T @ spec.scores
    if prior_w is not None:
        p -= (prior_w @ spec.vecs) * spec.lam
    return p


def spectral_map(spec: RowSpectrum, yb: np.ndarray, prior_w: np.ndarray | None, f: np.ndarray,
                 prior_b: np.ndarray | None = None, shrink: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """M = M₀ + P_r diag(f) Vᵀ and b = b₀ + s·r̄ − ΔM μ_A (float64; ``shrink`` = s, the share
    of the residual mean r̄ = μ_B − M₀μ_A − b₀ taken; no prior: M₀ = 0, b₀ = 0)."""
    p = residual_projection(spec, yb, prior_w)
    dw = (p * f) @ spec.vecs.T
    mu_b = np.asarray(yb, np.float64).mean(0)
    w0 = np.zeros_like(dw) if prior_w is None else prior_w
    b0 = np.zeros_like(mu_b) if prior_b is None else np.asarray(prior_b, np.float64)
    rbar = mu_b - w0 @ spec.mean - b0
    return w0 + dw, b0 + shrink * rbar - dw @ spec.mean


def naive(d_src: int, d_dst: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features passed unmapped (thesis §5.6): truncated or zero-padded to the target dimension."""
    w = np.eye(d_dst, d_src, dtype=np.float64)
    return w, np.zeros(d_dst), {"truncated": d_src > d_dst, "padded": d_src < d_dst}


@dataclass(frozen=True)
class AdamSchedule:
    """The paper's §4.2 optimiser settings: steps, learning rate (decayed by ``decay`` per step),
    rows per random batch, and the seed of the batch draws."""

    iterations: int = 200
    lr: float = 0.1
    decay: float = 1.0 - 1e-5
    batch_size: int = 2048
    seed: int = 0


def adam(x_src: Any, x_dst: Any, schedule: AdamSchedule = AdamSchedule(),
         rows: np.ndarray | None = None,
         progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The paper's §4.2 fit: minimise the mean Euclidean distance between unit-normalised predicted
    and true target features with Adam (``schedule``; β = 0.9/0.999, ε = 1e-8), on random batches
    streamed from ``x_src``/``x_dst`` ([n, d] arrays or store memmaps). ``rows`` restricts
    training to those row indices (e.g. the non-held-out part). W starts at 0 and b at the target
    mean, so the first prediction is never the zero vector. ``progress`` counts the steps.
    """
    import torch

    idx_all = np.arange(int(x_src.shape[0])) if rows is None else np.asarray(rows)
    n = idx_all.size
    if n < 2:
        raise AffeqError(f"adam needs at least 2 images, got {n}", "use more images")
    rng = np.random.default_rng(schedule.seed)
    d_a, d_b = int(x_src.shape[1]), int(x_dst.shape[1])
    probe = np.sort(rng.choice(idx_all, size=min(n, 8192), replace=False))
    mu_b = np.asarray(x_dst[probe], np.float64).mean(0)
    w = torch.zeros(d_b, d_a, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(mu_b, dtype=torch.float32, requires_grad=True)
    bs = min(schedule.batch_size, n)
    threads = torch.get_num_threads()
    if d_a * d_b * bs < 1 << 26:  # small products: thread hand-offs cost more than they save
        torch.set_num_threads(1)
    try:
        losses = _adam_loop(torch, (x_src, x_dst, idx_all), [w, b],
                            replace(schedule, batch_size=bs), rng, or_silent(progress))
    finally:
        torch.set_num_threads(threads)
    wn = w.detach().double().numpy()
    bn = b.detach().double().numpy()
    return wn, bn, {"iterations": schedule.iterations, "lr": schedule.lr,
                    "decay": schedule.decay, "batch_size": bs, "images": n,
                    "loss_first": losses[0], "loss_last": losses[-1],
                    "loss_min": float(min(losses))}


def _adam_loop(torch: Any, data: tuple[Any, Any, np.ndarray], params: list[Any],
               sched: AdamSchedule, rng: Any, bar: Progress) -> list[float]:
    """Adam steps on ``params`` (w, b) over random batches of the rows ``data[2]`` of
    ``data[0]``/``data[1]``; each batch's loss."""
    x_src, x_dst, idx_all = data
    w, b = params
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n, losses = idx_all.size, []
    bar.start("adam", total=sched.iterations, unit="step")
    for step in range(sched.iterations):
        # sampling with replacement keeps a step O(batch) on 1.28M rows; sorted for mmap locality
        sel = np.sort(idx_all[rng.integers(0, n, size=sched.batch_size)])
        xa = torch.from_numpy(np.asarray(x_src[sel], np.float32))
        xb = torch.from_numpy(np.asarray(x_dst[sel], np.float32))
        loss = _unit_distance(xa @ w.T + b, xb).mean()
        grads = torch.autograd.grad(loss, params)
        lr_t = sched.lr * sched.decay ** step  # exponential decay per iteration (paper §4.2)
        with torch.no_grad():  # Adam (Kingma & Ba), TF defaults, written out: no torch.optim import
            for p_, g, a1, a2 in zip(params, grads, m1, m2, strict=True):
                a1.mul_(beta1).add_(g, alpha=1 - beta1)
                a2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                mhat = a1 / (1 - beta1 ** (step + 1))
                vhat = a2 / (1 - beta2 ** (step + 1))
                p_.sub_(lr_t * mhat / (vhat.sqrt() + eps))
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise AffeqError(f"adam diverged at step {step} (loss {lv})", "lower the learning rate")
        losses.append(lv)
        bar.advance()
    bar.done()
    return losses


def _unit_distance(pred: Any, true: Any) -> Any:
    """‖pred/‖pred‖ − true/‖true‖‖ per row (the paper's error; a tiny ε keeps zero rows finite)."""
    import torch

    pn = pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    tn = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.linalg.vector_norm(pn - tn, dim=1)


def unit_loss(w: np.ndarray, b: np.ndarray, x_src: np.ndarray, x_dst: np.ndarray) -> float:
    """Mean unit-normalised Euclidean error of a map on arrays (NumPy, float64)."""
    pred = np.asarray(x_src, np.float64) @ w.T + b
    y = np.asarray(x_dst, np.float64)
    pn = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    tn = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return float(np.linalg.norm(pn - tn, axis=1).mean())
