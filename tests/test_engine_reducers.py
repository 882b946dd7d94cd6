"""extract's and evaluate's reducers on the pass engine run as a cluster runs them: a fresh reducer
per shard (pickled there and back), its state loaded into another fresh one and merged in shard
order. The store's bytes and the table's integers must equal those of the plain local pass."""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.engine import Reducer, Rows
from affeq_rt.errors import InternalError
from affeq_rt.io.maps import AffineMap, MapSet, load_maps, save_maps
from affeq_rt.io.store import ArrayStore, FeatureStore
from affeq_rt.method import evaluate as evaluate_module
from affeq_rt.method.evaluate import HeadTally, evaluate
from affeq_rt.method.extract import ExtractOptions, ImageOptions, StoreWriterReducer, extract
from affeq_rt.method.rows import StoreSource
from affeq_rt.progress import Progress, Silent

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402

MODELS = photos.E2E_MODELS
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos


def _travel(obj: object) -> object:
    """What a worker receives or sends back: a pickled copy."""
    return pickle.loads(pickle.dumps(obj))


def run_shard(rows: Rows, reducers: Mapping[str, Reducer], a: int, b: int) -> dict[str, dict]:
    """A worker's shard: fresh reducers (pickled to it) fed samples a…b; their states come back."""
    fresh = {k: _travel(r.fresh()) for k, r in reducers.items()}
    for c in rows.chunks(a, b):
        for r in fresh.values():
            r.update(c)
    return {k: _travel(r.state()) for k, r in fresh.items()}


def merge_states(reducers: Mapping[str, Reducer], states: Mapping[str, dict]) -> None:
    """The driver: each state loaded into a fresh reducer, merged into the in-place one."""
    for k, r in reducers.items():
        got = r.fresh()
        got.load(states[k])
        r.merge(got)


class ShardWorkers:
    """An executor that runs every shard as a cluster worker does (``run_shard``) and merges the
    results in shard order (``merge_states``): the engine's contract without a cluster."""

    name = "shards"

    def __init__(self, shard_size: int) -> None:
        self.shard_size = shard_size

    def run(self, rows: Rows, reducers: Mapping[str, Reducer], shards: Sequence[tuple[int, int]],
            on_commit: Callable[[int], None], progress: Progress) -> None:
        worker_rows = _travel(rows)  # sent once, as to an actor
        for a, b in shards:
            merge_states(reducers, run_shard(worker_rows, reducers, a, b))
            progress.advance(b - a)
            on_commit(b)


# ------------------------------------------------------------------------------------ extract

def _opts(env) -> ImageOptions:
    return ImageOptions(batch_size=2, workers=0, random_weights=True, export_root=env["exports"])


def _files(store: Path) -> dict[str, bytes]:
    names = ["images.txt", "labels.npy"] + [f"{m}/{f}" for m in MODELS
                                            for f in ("features.npy", "head.safetensors")]
    return {f: (store / f).read_bytes() for f in names}


class StopAfter(Silent):
    """Ctrl-C once ``at`` images of this run are done."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def advance(self, n: int = 1) -> None:
        self.seen += n
        if self.seen >= self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def local_store(env) -> Path:
    """The plain local run, batches of 2 (float32: random-weight features are too small for
    float16)."""
    out = env["base"] / "engine-local"
    extract(MODELS, env["photos"], out, options=ExtractOptions(dtype="float32", commit_every=0),
            images=_opts(env))
    return out


def test_store_written_shard_by_shard_is_byte_identical(env, local_store) -> None:
    # shards of 5 images → 6 on the batch grid: they cross the unreadable samples 2 and 7, so a
    # shard's rows start at a row count other than its first sample
    out = env["base"] / "engine-shards"
    res = extract(MODELS, env["photos"], out,
                  options=ExtractOptions(dtype="float32", commit_every=0, executor=ShardWorkers(5)),
                  images=_opts(env))
    assert _files(out) == _files(local_store)
    assert FeatureStore.open(out).manifest["skipped"] == \
        FeatureStore.open(local_store).manifest["skipped"]
    assert res.n == len(env["good"])


def test_store_interrupted_on_shards_resumed_locally_is_byte_identical(env, local_store) -> None:
    out = env["base"] / "engine-resumed"
    with pytest.raises(KeyboardInterrupt):  # in the third shard of 6: samples 0…12 committed
        extract(MODELS, env["photos"], out,
                options=ExtractOptions(dtype="float32", commit_every=0, executor=ShardWorkers(6)),
                images=_opts(env), progress=StopAfter(13))
    prog = json.loads((out / "progress.json").read_text())
    assert (prog["samples"], prog["rows"]) == (12, 10)  # samples 2 and 7 unreadable
    res = extract(MODELS, env["photos"], out,
                  options=ExtractOptions(dtype="float32", commit_every=0), images=_opts(env))
    assert res.resumed_from == 12
    assert _files(out) == _files(local_store)


def test_store_writer_reducer_travels_only_as_a_collector() -> None:
    collector = StoreWriterReducer({"a": 3, "b": 2})
    assert len(pickle.dumps(collector)) < 1000  # configuration only
    in_place = StoreWriterReducer({"a": 3, "b": 2})
    in_place.writer = object()  # any writer: it must never be pickled
    with pytest.raises(InternalError, match="collector"):
        pickle.dumps(in_place)
    # an empty collector's state has each model's width
    st = collector.state()
    assert st["features.a"].shape == (0, 3)
    assert st["features.b"].shape == (0, 2)


# ----------------------------------------------------------------------------------- evaluate

DIMS = {"alpha": 24, "beta": 32, "gamma": 16}
K = 12


def _problem(n: int, seed: int = 0) -> tuple[ArrayStore, MapSet]:
    """Features sharing a latent class signal (float16, as stores keep them), heads that read it,
    least-squares maps between them (fitted on ≥ 400 rows), the store holding the first n rows."""
    rng = np.random.default_rng(seed)
    full, n = n, max(n, 400)
    labels = rng.integers(0, K, n)
    latent = rng.standard_normal((K, 8))[labels] + 0.9 * rng.standard_normal((n, 8))
    feats, heads = {}, {}
    for m, d in DIMS.items():
        f = latent @ rng.standard_normal((8, d)) + 0.3 * rng.standard_normal((n, d))
        feats[m] = f.astype(np.float16)
        w = np.linalg.lstsq(f, np.eye(K)[labels] - 1.0 / K, rcond=None)[0].T
        heads[m] = (w.astype(np.float32), (0.1 * rng.standard_normal(K)).astype(np.float32))
    maps = []
    for a in DIMS:
        z = np.hstack([feats[a].astype(np.float64), np.ones((n, 1))])
        for b in DIMS:
            if a != b:
                sol = np.linalg.lstsq(z, feats[b].astype(np.float64), rcond=None)[0]
                maps.append(AffineMap(a, b, sol[:-1].T.astype(np.float32),
                                      sol[-1].astype(np.float32), "lstsq"))
    specs = {m: {"name": m, "label_offset": 0} for m in DIMS}
    return (ArrayStore({m: f[:full] for m, f in feats.items()}, heads, labels[:full], specs),
            MapSet(maps))


def _tally(store: ArrayStore, maps: MapSet) -> HeadTally:
    return HeadTally(maps, store, list(DIMS), "cpu")


def test_tally_merged_over_uneven_shards_equals_one_pass() -> None:
    n = 21  # not a multiple of 8: the shards' correctness bits straddle bytes
    store, maps = _problem(n)
    rows = StoreSource(store)
    whole = _tally(store, maps)
    for c in rows.chunks(0):
        whole.update(c)
    merged = _tally(store, maps)
    for a, b in ((0, 5), (5, 18), (18, 21)):
        merge_states({"t": merged}, run_shard(rows, {"t": merged}, a, b))
    one, parts = whole.result(n), merged.result(n)
    for x, y in zip(one, parts, strict=True):
        np.testing.assert_array_equal(x, y)
    hits = one[0]
    assert hits.min() > n // 4  # real hits (chance is n/12), not all of them everywhere
    assert hits.min() < n
    with pytest.raises(InternalError, match="only a fresh"):
        pickle.dumps(merged)
    merged.release()


def test_evaluate_on_shard_workers_equals_local(tmp_path) -> None:
    # shards of 4096 rows (the store source's chunk) over 9001: the last one short and odd
    store, maps = _problem(9001, seed=3)
    save_maps(tmp_path / "maps.safetensors", maps)
    local = evaluate(store, maps, device="cpu")
    on_file = load_maps(tmp_path / "maps.safetensors")
    sent = _travel(_tally(store, on_file).fresh())
    assert sent.maps == str((tmp_path / "maps.safetensors").resolve())  # the path travels
    sharded = evaluate(store, on_file, device="cpu", executor=ShardWorkers(4096))
    for k in ("pred", "correct", "top1", "top5", "agree", "agree_unmapped"):
        np.testing.assert_array_equal(getattr(sharded, k), getattr(local, k), err_msg=k)
    assert evaluate_module._CACHE == {}  # the folded heads are released after the pass
