"""The statistics of fit's pass, as reducers of the pass engine (``engine.reducer.Reducer``).

- :class:`GramReducer`: the training and held-out Gram states of joint rows (held out by sample
  index), with, when asked, ``RowNorms`` of every row (debiased CKA) and Gram snapshots at fixed
  training-row counts (the data-efficiency curve).
- :class:`HeldOutRows`: the first held-out rows (the quality gate on streamed images).
- :class:`AllRows`: every row in memory (the few-data estimators).
- :class:`Skipped`: the samples that had no row (unreadable images).
- :class:`Signatures`: every row's near-duplicate signature (``method.dedup``).
- :class:`PermutedCross`: cross products of rows paired through seeded permutations (the
  permutation null of ``method.null``).

Each runs the same in place (``engine.LocalExecutor``: exactly the sums of one loop) and on a
cluster's workers (a fresh reducer per shard, merged in shard order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.engine.reducer import Chunk, State
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.method.dedup import SIGNATURE_DIMS, projection, signatures
from affeq_rt.method.solvers import Moments


def feed_rows(acc_t: GramAccumulator, acc_h: GramAccumulator, x: np.ndarray,
              mask: np.ndarray) -> None:
    """Training rows to ``acc_t``, held-out rows to ``acc_h`` (row order kept; ``mask`` marks the
    held-out ones)."""
    if mask.any():
        if (~mask).any():
            acc_t.update(np.ascontiguousarray(x[~mask]))
        acc_h.update(np.ascontiguousarray(x[mask]))
    elif x.shape[0]:
        acc_t.update(x)


def _gram_state(prefix: str, acc: GramAccumulator) -> State:
    n, skipped, mean, packed = acc.state()
    return {f"{prefix}_n": n, f"{prefix}_skipped": skipped, f"{prefix}_mean": mean,
            f"{prefix}_packed": packed}


def _gram_load(prefix: str, st: State, dim: int, device: str) -> GramAccumulator:
    return GramAccumulator.from_state(dim, (st[f"{prefix}_n"], st[f"{prefix}_skipped"],
                                            st[f"{prefix}_mean"], st[f"{prefix}_packed"]), device)


class RowNorms:
    """Streaming fourth-moment statistics of joint rows for debiased CKA.

    For per-model squared norms r_m(i) = ‖x_i[P_m] − c[P_m]‖² of rows shifted by a fixed reference
    c (the first rows' mean, so the sums stay small), keeps n, T = Σ r rᵀ (k×k) and
    U = Σ r (x − c)ᵀ (k×D), float64. With the Gram's mean and scatter they give
    Σ_i ‖x̃_i[P_a]‖² ‖x̃_i[P_b]‖² for centred rows x̃ exactly (:meth:`centred_products`). Rows with NaN
    or Inf are skipped, as the Gram accumulator skips them.
    """

    def __init__(self, slices: Mapping[str, slice], dim: int) -> None:
        self.names = list(slices)
        self.slices = dict(slices)
        self.dim = int(dim)
        self.n = 0
        k = len(self.names)
        self.ref: np.ndarray | None = None
        self.t = np.zeros((k, k))
        self.u = np.zeros((k, self.dim))

    def update(self, x: np.ndarray) -> None:
        """Add rows ``[m, D]`` (float32/float64)."""
        x = np.asarray(x, np.float64)
        x = x[np.isfinite(x).all(axis=1)]
        if not x.shape[0]:
            return
        if self.ref is None:
            self.ref = x.mean(axis=0)
        y = x - self.ref
        r = np.stack([np.einsum("ij,ij->i", y[:, s], y[:, s]) for s in self.slices.values()],
                     axis=1)  # [m, k]
        self.t += r.T @ r
        self.u += r.T @ y
        self.n += int(x.shape[0])

    def merge(self, other: RowNorms) -> None:
        """Add the sums of the following rows (taken with the same reference, or none yet)."""
        if other.n == 0:
            return
        if self.n == 0 and self.ref is None:
            self.ref = other.ref
        elif other.ref is not self.ref and not np.array_equal(other.ref, self.ref):
            raise InternalError("row statistics with different references cannot be merged")
        self.t += other.t
        self.u += other.u
        self.n += other.n

    def state(self) -> State:
        """The exact sums (float64 arrays) and the reference."""
        st: State = {"norms_n": self.n, "norms_t": self.t, "norms_u": self.u}
        if self.ref is not None:
            st["norms_ref"] = self.ref
        return st

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.n = int(st["norms_n"])
        self.ref = np.array(st["norms_ref"], np.float64) if "norms_ref" in st else None
        self.t = np.array(st["norms_t"], np.float64).reshape(self.t.shape)
        self.u = np.array(st["norms_u"], np.float64).reshape(self.u.shape)

    def subset(self, names: Sequence[str]) -> RowNorms:
        """The statistics of some of the models, over the same rows."""
        idx = [self.names.index(m) for m in names]
        out = RowNorms({m: self.slices[m] for m in names}, self.dim)
        out.n, out.ref, out.t, out.u = self.n, self.ref, self.t[np.ix_(idx, idx)], self.u[idx]
        return out

    def centred_products(self, moments: Moments) -> np.ndarray:
        """C[a, b] = Σ_i ‖x̃_i[P_a]‖² ‖x̃_i[P_b]‖² over centred rows (k×k), from these sums and the
        Gram's mean and scatter over the same rows.

        With δ = μ − c, s_a(i) = (x_i − c)[P_a]·δ_a, e_a = ‖δ_a‖², R_a = Σ_i r_a(i):
        ‖x̃_i[P_a]‖² = r_a − 2 s_a + e_a, and Σ_i s_a = n e_a, so
        C = T − 2(V + Vᵀ) + R eᵀ + e Rᵀ + 4 Q + n e eᵀ with V[a,b] = U[a, P_b]·δ_b and
        Q[a,b] = δ_aᵀ S_ab δ_b.
        """
        if int(moments.n) != self.n:
            raise AffeqError(f"row statistics cover {self.n} rows but the Gram {int(moments.n)}",
                             "accumulate both over the same rows")
        k = len(self.names)
        if self.n == 0 or self.ref is None:
            return np.zeros((k, k))
        delta = moments.mean() - self.ref
        sl = list(self.slices.values())
        e = np.array([float(delta[s] @ delta[s]) for s in sl])
        # R_a = Σ_i r_a(i), the trace of the shifted second moment: tr S_aa + n e_a
        rsum = np.array([float(np.trace(moments.scatter(s, s))) for s in sl]) + self.n * e
        v = np.array([[float(self.u[i, s] @ delta[s]) for s in sl] for i in range(k)])
        q = np.array([[float(delta[a] @ moments.scatter(a, b) @ delta[b]) for b in sl]
                      for a in sl])
        return (self.t - 2.0 * (v + v.T) + np.outer(rsum, e) + np.outer(e, rsum) + 4.0 * q
                + self.n * np.outer(e, e))

class GramReducer:
    """Training and held-out Gram of joint rows ``[F_1 … F_k]`` (``slices``: where each model sits).

    ``snapshots``: training-row counts (NaN rows included) at which the training Gram is snapshot
    (``GramAccumulator.snapshot``: the block buffer untouched, so the maps are the same bits with
    or without them). In place, ``on_snapshot(snapshot)`` scores it at once into :attr:`points`;
    a shard's reducer keeps the cut and its merge into the prefix scores prefix + cut.
    """

    def __init__(self, slices: Mapping[str, slice], mask: np.ndarray, device: str = "auto",
                 snapshots: Sequence[int] = (), on_snapshot: Callable[[Any], dict] | None = None,
                 row_norms: bool = False) -> None:
        self.slices = dict(slices)
        self.dim = max((s.stop for s in self.slices.values()), default=0)
        self.mask = mask
        self.device = device
        self.sizes = sorted(int(p) for p in snapshots)
        self.on_snapshot = on_snapshot
        self.row_norms = row_norms
        self.train = GramAccumulator(self.dim, device=device)
        self.holdout = GramAccumulator(self.dim, device=device)
        self.norms = RowNorms(self.slices, self.dim) if row_norms else None
        self.base: int | None = 0  # training rows before this reducer's first (None: unknown)
        self.fed = 0  # training rows this reducer took
        self.points: list[dict[str, Any]] = []  # scored snapshots
        self.cuts: list[tuple[int, GramAccumulator]] = []  # unscored (a shard's)

    def fresh(self) -> GramReducer:
        """An empty reducer for a shard: no scorer (its merge scores), the prefix's norms ref."""
        out = GramReducer(self.slices, self.mask, self.device, self.sizes, None, self.row_norms)
        out.base = None
        if out.norms is not None and self.norms is not None:
            out.norms.ref = self.norms.ref
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the configuration (a fresh reducer on its way to a worker)."""
        if self.train.n or self.holdout.n or self.fed:
            raise InternalError("only a fresh GramReducer travels to a worker")
        ref = None if self.norms is None else self.norms.ref
        return {"cfg": (self.slices, self.mask, self.device, self.sizes, self.row_norms),
                "ref": ref}

    def __setstate__(self, st: dict[str, Any]) -> None:
        slices, mask, device, sizes, row_norms = st["cfg"]
        self.__init__(slices, mask, device, sizes, None, row_norms)
        self.base = None
        if self.norms is not None:
            self.norms.ref = st["ref"]

    def _pending(self) -> list[int]:
        done = (self.base or 0) + self.fed
        return [p for p in self.sizes if p > done]

    def update(self, c: Chunk) -> None:
        """Add a chunk: norms of every row, training/held-out split, snapshots on the way."""
        m = self.mask[c.index]
        x = c.x
        if self.norms is not None:
            self.norms.update(x)
        if self.base is None:  # a shard's reducer: rows are addressable (none skipped) here
            self.base = int((~self.mask[:c.start]).sum()) if self.sizes else 0
        pending = self._pending()
        while pending:
            train_idx = np.flatnonzero(~m)
            done = self.base + self.fed
            if done + train_idx.size < pending[0]:
                break
            cut = int(train_idx[pending[0] - done - 1]) + 1  # rows up to the point's last one
            feed_rows(self.train, self.holdout, x[:cut], m[:cut])
            self.fed += int((~m[:cut]).sum())
            x, m = x[cut:], m[cut:]
            self._snapshot(pending.pop(0))
        feed_rows(self.train, self.holdout, x, m)
        self.fed += int((~m).sum())

    def _snapshot(self, at: int) -> None:
        if self.on_snapshot is not None:
            self.points.append(self.on_snapshot(self.train.snapshot()))
        else:
            self.cuts.append((at, self.train.snapshot()))

    def merge(self, other: GramReducer) -> None:
        """Add the following shard: cuts scored on prefix + cut, then the Grams and norms."""
        for _at, cut in other.cuts:
            snap = self.train.snapshot().merge(cut)
            if self.on_snapshot is None:
                raise InternalError("a shard's snapshot reached a prefix that cannot score it")
            self.points.append(self.on_snapshot(snap))
        self.points += other.points
        self.train.merge(other.train)
        self.holdout.merge(other.holdout)
        if self.norms is not None and other.norms is not None:
            self.norms.merge(other.norms)
        self.fed += other.fed

    def state(self) -> State:
        """Both Grams, norms, counts, points and cuts (exact float64)."""
        st: State = {"fed": self.fed, "base": self.base, "points": self.points,
                     **_gram_state("train", self.train), **_gram_state("holdout", self.holdout),
                     "cuts": [at for at, _ in self.cuts]}
        for i, (_at, g) in enumerate(self.cuts):
            st.update(_gram_state(f"cut{i}", g))
        if self.norms is not None:
            st.update(self.norms.state())
        return st

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.fed, self.base, self.points = int(st["fed"]), st["base"], list(st["points"])
        self.train = _gram_load("train", st, self.dim, self.device)
        self.holdout = _gram_load("holdout", st, self.dim, self.device)
        self.cuts = [(int(at), _gram_load(f"cut{i}", st, self.dim, self.device))
                     for i, at in enumerate(st["cuts"])]
        if self.norms is not None:
            self.norms.load(st)


class KeptRows:
    """Rows of the pass kept in memory with their sample indices: what :class:`HeldOutRows` and
    :class:`AllRows` share (the kept rows, forgetting some, the state)."""

    def __init__(self) -> None:
        self.x: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.count = 0

    def _keep(self, x: np.ndarray, index: np.ndarray) -> None:
        self.x.append(x)
        self.index.append(index)
        self.count += int(x.shape[0])

    def drop(self, samples: np.ndarray) -> None:
        """Forget the kept rows of the samples flagged in ``samples`` (bool [n])."""
        got = self.rows()
        if got is not None:
            keep = ~samples[got[1]]
            self.x, self.index = ([got[0][keep]], [got[1][keep]]) if keep.any() else ([], [])
            self.count = int(keep.sum())

    def rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows float32 [k, Σd], sample indices [k]), or None when none was kept."""
        if not self.x:
            return None
        return np.concatenate(self.x), np.concatenate(self.index)

    def state(self) -> State:
        """The kept rows."""
        got = self.rows()
        return {} if got is None else {"x": got[0], "index": got[1]}

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.x = [st["x"]] if "x" in st else []
        self.index = [st["index"]] if "index" in st else []
        self.count = int(self.x[0].shape[0]) if self.x else 0


class HeldOutRows(KeptRows):
    """The first ``limit`` held-out rows (``mask`` by sample index) and their sample indices."""

    def __init__(self, mask: np.ndarray, limit: int) -> None:
        super().__init__()
        self.mask, self.limit = mask, int(limit)

    def fresh(self) -> HeldOutRows:
        """An empty one with the same mask and limit."""
        return HeldOutRows(self.mask, self.limit)

    def update(self, c: Chunk) -> None:
        """Copy the chunk's held-out rows aside, up to the limit."""
        i = c.index
        m = self.mask[i]
        if m.any() and self.count < self.limit:
            take = np.flatnonzero(m)[:self.limit - self.count]
            self._keep(np.array(c.x[take], np.float32), i[take])

    def merge(self, other: HeldOutRows) -> None:
        """Append the following shard's rows, up to the limit."""
        for x, i in zip(other.x, other.index, strict=True):
            k = min(x.shape[0], self.limit - self.count)
            if k > 0:
                self._keep(x[:k], i[:k])


class AllRows(KeptRows):
    """Every row of the pass in memory, with its sample index (the few-data estimators)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = int(width)

    def fresh(self) -> AllRows:
        """An empty one."""
        return AllRows(self.width)

    def update(self, c: Chunk) -> None:
        """Keep the chunk's rows."""
        self._keep(np.asarray(c.x, np.float32), c.index)

    def merge(self, other: AllRows) -> None:
        """Append the following shard's rows."""
        for x, i in zip(other.x, other.index, strict=True):
            self._keep(x, i)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows float32 [m, Σd], sample indices [m])."""
        got = self.rows()
        return got if got is not None else (np.zeros((0, self.width), np.float32),
                                            np.zeros(0, np.int64))


class Skipped:
    """The samples that had no row (``{index, path, reason}``), in sample order."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def fresh(self) -> Skipped:
        """An empty list."""
        return Skipped()

    def update(self, c: Chunk) -> None:
        """Note the chunk's unreadable samples."""
        self.items += c.skipped

    def merge(self, other: Skipped) -> None:
        """Append the following shard's."""
        self.items += other.items

    def state(self) -> State:
        """The list (JSON)."""
        return {"items": self.items}

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.items = list(st["items"])


class Signatures:
    """Every row's near-duplicate signature (``dedup.signatures``) and sample index."""

    def __init__(self, slices: Mapping[str, slice]) -> None:
        self.slices = dict(slices)
        self.proj = projection(max(s.stop for s in self.slices.values()))
        self.sig: list[np.ndarray] = []
        self.index: list[np.ndarray] = []

    def fresh(self) -> Signatures:
        """An empty one."""
        return Signatures(self.slices)

    def __getstate__(self) -> dict[str, Any]:
        """Travel without the projection (rebuilt from its seed)."""
        return {"slices": self.slices, "sig": self.sig, "index": self.index}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(st["slices"])
        self.sig, self.index = st["sig"], st["index"]

    def update(self, c: Chunk) -> None:
        """The chunk's signatures."""
        self.sig.append(signatures(c.x, self.slices, self.proj))
        self.index.append(c.index)

    def merge(self, other: Signatures) -> None:
        """Append the following shard's."""
        self.sig += other.sig
        self.index += other.index

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(signatures [m, dims], sample indices [m])."""
        if not self.sig:
            return np.zeros((0, SIGNATURE_DIMS), np.float32), np.zeros(0, np.int64)
        return np.concatenate(self.sig), np.concatenate(self.index)

    def state(self) -> State:
        """The signatures and indices."""
        s, i = self.rows()
        return {"sig": s, "index": i}

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.sig, self.index = [np.asarray(st["sig"])], [np.asarray(st["index"], np.int64)]


NULL_SEED = 26  # the permutations of PermutedCross: default_rng([NULL_SEED, k, chunk start])


def chunk_permutation(k: int, start: int, rows: int) -> np.ndarray:
    """Permutation ``k`` of a chunk's ``rows`` (starting at sample ``start``)."""
    return np.random.default_rng([NULL_SEED, k, start]).permutation(rows)


class PermutedCross:
    """Σ_i x_a,i x_b,π_k(i)ᵀ (float64) for every pair a < b of ``slices`` (or only the given
    ``pairs``) and k < ``count``; ``mask`` (bool [n], optional): samples left out (the shuffled
    control: training rows only)."""

    def __init__(self, slices: Mapping[str, slice], count: int,
                 mask: np.ndarray | None = None,
                 pairs: Sequence[tuple[str, str]] | None = None) -> None:
        self.slices, self.count, self.mask = dict(slices), int(count), mask
        names = list(self.slices)
        if pairs is None:
            pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        self.pairs: list[tuple[str, str]] = []
        for a, b in pairs:  # one block per unordered pair: b→a reads a→b's transposed
            if a != b and (a, b) not in self.pairs and (b, a) not in self.pairs:
                self.pairs.append((a, b))
        self.sums = {f"{a}|{b}": np.zeros((self.count, self._w(a), self._w(b)))
                     for a, b in self.pairs}

    def _w(self, m: str) -> int:
        return self.slices[m].stop - self.slices[m].start

    def fresh(self) -> PermutedCross:
        """An empty one."""
        return PermutedCross(self.slices, self.count, self.mask, self.pairs)

    def update(self, c: Chunk) -> None:
        """The chunk's permuted cross products (rows with NaN/Inf left out, as the Gram does)."""
        x = np.asarray(c.x, np.float64)
        if self.mask is not None:
            x = x[~self.mask[c.index]]
        x = x[np.isfinite(x).all(axis=1)]
        for k in range(self.count):
            xp = x[chunk_permutation(k, c.start, x.shape[0])]
            for a, b in self.pairs:
                self.sums[f"{a}|{b}"][k] += x[:, self.slices[a]].T @ xp[:, self.slices[b]]

    def merge(self, other: PermutedCross) -> None:
        """Add the following shard's sums."""
        for key, v in other.sums.items():
            self.sums[key] += v

    def state(self) -> State:
        """The sums."""
        return dict(self.sums)

    def load(self, st: State) -> None:
        """Restore :meth:`state`."""
        self.sums = {k: np.asarray(st[k], np.float64) for k in self.sums}
