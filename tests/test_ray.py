"""The Ray executor (affeq_rt.cluster) against the local path on real-photo crops: extract, fit and
evaluate on a local Ray cluster give the local results, also after a killed worker or driver;
without Ray, ``--executor ray`` fails with one line saying how to install it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cluster.ray import RayExecutor, executor_for
from affeq_rt.cluster.worker import Worker
from affeq_rt.engine import LocalExecutor, grid, on_grid
from affeq_rt.errors import AffeqError
from affeq_rt.io.maps import load_maps
from affeq_rt.io.store import FeatureStore
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
from affeq_rt.method.fit import FitOptions, fit, holdout_mask
from affeq_rt.method.rows import row_source, source_groups
from affeq_rt.method.solvers import default_rcond
from affeq_rt.progress import Silent

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402

MODELS = photos.E2E_MODELS[:2]  # mobilenet_v2, efficientnet_lite0 (1280-d each)
N_CROPS = 96
BATCH = 8
SHARD = 16  # images per shard: 97 samples (one unreadable, mid-list): 6 shards and one of 1
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos


# ---------------------------------------------------------------------------------------------
# without Ray


def test_grid_is_fixed_by_the_sample_index() -> None:
    assert grid(0, 70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert grid(40, 70, 32) == [(40, 64), (64, 70)]  # a resumed store keeps the same grid
    assert grid(70, 70, 32) == []
    assert on_grid(1000, 32) == 1024
    assert on_grid(1, 8) == 8


def test_without_ray_one_line_install_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert isinstance(executor_for("local"), LocalExecutor)
    with pytest.raises(AffeqError) as e:
        executor_for("ray")
    assert str(e.value) == ("--executor ray needs Ray, which is not installed; "
                            "pip install 'affeq-rt[ray]'")
    with pytest.raises(AffeqError, match="unknown executor"):
        executor_for("dask")


def test_cli_without_ray_prints_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None; from affeq_rt.cli.main import main; "
            "sys.exit(main(['evaluate', '--features', 'x', '--maps', 'y', '--out', 'z', "
            "'--executor', 'ray']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: --executor ray needs Ray, which is not installed; pip install 'affeq-rt[ray]'"]


# ---------------------------------------------------------------------------------------------
# a local Ray cluster, shared by the tests below


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: 8 logical CPUs (2 real cores must not starve two workers and the
    driver's tasks), no dashboard; shut down after the module."""
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # token auth off (drivers of the tests connect too)
    mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no accelerator warning on CPU
    ctx = ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def crops(env) -> Path:
    """N_CROPS real-photo crops (64–160 px, scikit-image's colour photos) and one corrupt file."""
    from PIL import Image

    folder = env["base"] / "crops"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pics = [Image.open(p).convert("RGB") for p in env["good"][:8]]
    for i in range(N_CROPS):
        im = pics[i % len(pics)]
        s = int(rng.integers(64, min(160, *im.size)))
        x, y = int(rng.integers(0, im.size[0] - s)), int(rng.integers(0, im.size[1] - s))
        im.crop((x, y, x + s, y + s)).save(folder / f"crop{i:04d}.jpg", quality=90)
    # unreadable, mid-list: sample 41 of 97 (after crop0040.jpg), inside the third shard of 16
    (folder / "crop0040x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return folder


def _opts(env) -> ImageOptions:
    return ImageOptions(batch_size=BATCH, workers=0, random_weights=True,
                        export_root=env["exports"])


def _ray(**kw) -> RayExecutor:
    return RayExecutor(workers=2, shard_size=SHARD, **kw)


class KillOnce(Silent):
    """A progress display that kills one Ray worker (SIGKILL, by PID) once ``after`` items are
    done: the run must replace it and redo its shard."""

    def __init__(self, ex: RayExecutor, after: int) -> None:
        self.ex, self.after, self.seen, self.killed = ex, after, 0, None

    def advance(self, n: int = 1) -> None:
        self.seen += n
        if self.killed is None and self.seen >= self.after and self.ex.pids:
            self.killed = self.ex.pids[0]
            os.kill(self.killed, signal.SIGKILL)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(store: Path) -> dict:
    m = json.loads((store / "manifest.json").read_text())
    for k in ("run", "updated"):  # the clock: differs between any two runs, local ones too
        m.pop(k)
    return m


def assert_same_store(a: Path, b: Path) -> None:
    """Every data file byte for byte; the manifest up to the run's timing."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k] == fb[k], k
    assert _manifest(a) == _manifest(b)


@pytest.fixture(scope="module")
def local_store(env, crops) -> Path:
    res = extract(MODELS, crops, env["base"] / "local-store",
                  options=ExtractOptions(dtype="float32"), images=_opts(env))
    assert res.n == N_CROPS
    assert [s["index"] for s in res.skipped] == [41]
    return res.path


@pytest.mark.usefixtures("cluster")
def test_extract_ray_equals_local_after_a_killed_worker(env, crops, local_store):
    ex = _ray()
    kill = KillOnce(ex, after=SHARD)
    res = extract(MODELS, crops, env["base"] / "ray-store",
                  options=ExtractOptions(dtype="float32", executor=ex), images=_opts(env),
                  progress=kill)
    assert kill.killed is not None
    assert ex.restarts >= 1
    assert res.n == N_CROPS
    assert_same_store(local_store, res.path)
    assert not (res.path / ".ray-shards").exists()


def _driver(args: list[str], address: str, until, timeout: float = 120.0) -> None:
    """Run ``affeq-rt ARGS --executor ray`` as a separate driver on the cluster and SIGKILL it as
    soon as ``until()`` holds (some work committed)."""
    cmd = [sys.executable, "-m", "affeq_rt", *args, "--executor", "ray", "--address", address,
           "--ray-workers", "2", "--shard-size", str(SHARD), "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while not until():
            if p.poll() is not None:
                raise AssertionError(f"driver ended first (exit {p.returncode}): "
                                     f"{p.stdout.read().decode()[-1000:]}"
                                     f"{p.stderr.read().decode()[-2000:]}")
            assert time.monotonic() - t0 < timeout, "no progress committed in time"
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _common(env, crops) -> list[str]:
    return ["--models", ",".join(MODELS), "--data", str(crops), "--batch-size", str(BATCH),
            "--workers", "0", "--random-weights", "--export-root", env["exports"]]


@pytest.mark.slow
def test_extract_killed_driver_resumes_identically(env, crops, cluster, local_store):
    out = env["base"] / "ray-store-killed"

    def committed() -> bool:
        prog = out / "progress.json"
        try:
            return json.loads(prog.read_text())["samples"] > 0
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    _driver(["extract", *_common(env, crops), "--out", str(out), "--dtype", "float32",
             "--commit-every", "0"], cluster, committed)  # a commit after every shard
    res = extract(MODELS, crops, out, options=ExtractOptions(dtype="float32", executor=_ray()),
                  images=_opts(env))
    assert res.resumed_from > 0
    assert_same_store(local_store, res.path)


# ---------------------------------------------------------------------------------------------
# fit


@pytest.fixture(scope="module")
def local_fit(env, crops):
    return fit(crops, MODELS, "ols", out=env["base"] / "local.safetensors", images=_opts(env))


def kappas(env, crops, store: Path) -> dict[str, tuple[float, int]]:
    """Per source: (κ = λ_max/λ_min over the kept eigenvalues of the training scatter S_AA, rows),
    in float64 from the float32 store (the very features the fits saw)."""
    rows = row_source(crops, MODELS, _opts(env))
    mask = holdout_mask(rows.n, 0.1, 0, source_groups(rows))
    st = FeatureStore.open(store)
    readable = {p: i for i, p in enumerate(st.images)}
    train = [readable[s.path] for i, s in enumerate(rows.data.samples)
             if s.path in readable and not mask[i]]
    out = {}
    for m in MODELS:
        x = np.asarray(st.features(m), np.float64)[train]
        x -= x.mean(axis=0)
        lam = np.linalg.eigvalsh(x.T @ x)
        kept = lam[lam > default_rcond(x.shape[1]) * lam[-1]]
        out[m] = (float(kept[-1] / kept[0]), len(train))
    return out


def assert_maps_close(a, b, kappa: dict[str, tuple[float, int]]) -> None:
    """Maps from partial Grams merged in shard order against one sequential pass, both float64.

    The two states hold the same sums in another association. Per entry each is within
    γ_n·Σ|y_i||y_j| of the exact sum (γ_n = n·eps64, core/gram.py), so ‖ΔS‖₂ ≤ 2γ_n·‖Y‖_F²
    = 2γ_n·tr(S) ≤ 2γ_n·d·λ_max. A least-squares map W = S_BA·S_AA⁺ on the kept eigen-directions
    then moves by at most ε·κ·‖W‖ to first order (ε = 2γ_n·d relative to λ_max, κ of S_AA over
    the kept directions), and each side is rounded once more to float32 (half an ulp, 2⁻²⁴
    relative). Bound: |ΔW| ≤ 4·κ·n·d·eps64·‖W‖_F + 2⁻²³·max|W| (the factor 2 on the first term
    covers the bias, which moves with W·mean)."""
    assert sorted(a) == sorted(b)
    eps = float(np.finfo(np.float64).eps)
    for key in a:
        ma, mb = a[key], b[key]
        k, n = kappa[ma.src]
        d = ma.weight.shape[1]
        for x, y in ((ma.weight, mb.weight), (ma.bias, mb.bias)):
            x64 = x.astype(np.float64)
            tol = 4 * k * n * d * eps * float(np.linalg.norm(x64)) + 2.0 ** -23 * np.abs(x64).max()
            np.testing.assert_allclose(y, x, rtol=0, atol=tol)
        assert mb.stats["images"] == ma.stats["images"]


@pytest.fixture(scope="module")
def ray_fit(env, crops, cluster):  # noqa: ARG001 (the cluster must be up)
    """A Ray fit during which one worker is killed (SIGKILL) after the first shard."""
    ex = _ray()
    kill = KillOnce(ex, after=SHARD)
    res = fit(crops, MODELS, "ols", out=env["base"] / "ray.safetensors", images=_opts(env),
              options=FitOptions(executor=ex), progress=kill)
    assert kill.killed is not None
    assert ex.restarts >= 1
    return res


def test_fit_ray_equals_local_after_a_killed_worker(env, crops, local_store, local_fit,
                                                    ray_fit):
    res = ray_fit
    assert res.images == local_fit.images == N_CROPS
    assert res.skipped == local_fit.skipped
    assert_maps_close(local_fit.maps, res.maps, kappas(env, crops, local_store))
    assert not Path(str(res.path) + ".partial").exists()


@pytest.mark.slow
def test_fit_killed_driver_resumes_identically(env, crops, cluster, ray_fit):
    out = env["base"] / "ray-killed.safetensors"
    prefix = Path(str(out) + ".partial") / "pass.json"
    _driver(["fit", *_common(env, crops), "--method", "ols", "--out", str(out),
             "--checkpoint-every", str(SHARD)], cluster, prefix.is_file)
    res = fit(crops, MODELS, "ols", out=out, images=_opts(env),
              options=FitOptions(executor=_ray(), checkpoint_every=SHARD))
    assert res.resumed_from >= SHARD
    # partial Grams are merged in shard order, whoever ran what and however often the driver
    # restarted (the prefix state is saved as exact float64 bytes; saving a merged state flushes
    # nothing): bit-identical maps
    for key, m in ray_fit.maps.items():
        assert np.array_equal(m.weight, res.maps[key].weight), key
        assert np.array_equal(m.bias, res.maps[key].bias), key


# ---------------------------------------------------------------------------------------------
# evaluate


@pytest.mark.usefixtures("cluster")
def test_evaluate_ray_equals_local_exactly(local_store, local_fit):
    st = FeatureStore.open(local_store)
    maps = load_maps(local_fit.path)
    a = evaluate(st, maps)
    b = evaluate(st, maps, executor=_ray())
    assert a.models == b.models
    assert a.n == b.n
    assert np.array_equal(a.pred, b.pred)
    assert np.array_equal(a.agree, b.agree)
    assert np.array_equal(a.agree_unmapped, b.agree_unmapped)
    assert np.array_equal(a.top1, b.top1, equal_nan=True)


@pytest.mark.usefixtures("cluster")
def test_a_workers_user_error_reaches_the_driver_as_one_line(tmp_path, local_store, local_fit):
    bogus = tmp_path / "not-maps.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    maps = load_maps(local_fit.path)
    maps.path = str(bogus)  # the workers read the maps from this file
    with pytest.raises(AffeqError) as e:
        evaluate(FeatureStore.open(local_store), maps, executor=_ray())
    assert type(e.value) is AffeqError
    assert "\n" not in str(e.value)


@pytest.mark.usefixtures("cluster")
def test_workers_the_cluster_cannot_place_are_refused_not_awaited(local_store, local_fit):
    with pytest.raises(AffeqError, match="not one worker of 1 GPUs"):  # the cluster has no GPU
        evaluate(local_store, local_fit.path, executor=_ray(gpus_per_worker=1.0))


def test_a_worker_with_another_export_refuses_to_start(env, crops):
    """Every worker checks its features.onnx against the driver's SHA-256 (one cache per node):
    the rows a worker unpickles carry the driver's digests; here they are forged."""
    rows = row_source(crops, MODELS, _opts(env))
    there = pickle.loads(pickle.dumps(rows))  # what a worker receives
    there._exports = {m: "0" * 64 for m in MODELS}  # not the exports' digests
    with pytest.raises(AffeqError, match="has another export of mobilenet_v2") as e:
        Worker(there).start()
    assert type(e.value) is AffeqError
    assert Worker(pickle.loads(pickle.dumps(rows))).start() == os.getpid()


@pytest.mark.usefixtures("cluster")
def test_fit_ray_with_curve_and_similarity_equals_local(env, crops, local_store):
    """Every fit feature on the cluster, from a feature store: the maps (bounds of
    assert_maps_close), the data-efficiency curve's points (the same training-row counts; each
    point's OLS maps carry the same bound, and the scores are integer counts over the same
    held-out rows) and the similarity table, debiased CKA included (float64 measures from Grams
    and row sums that differ only in association: ≤ ~1e-9 relative at these condition numbers)."""
    opt = {"curve": "24,48", "similarity": True, "device": "cpu"}
    here = fit(local_store, None, "ols", options=FitOptions(**opt))
    there = fit(local_store, None, "ols", options=FitOptions(executor=_ray(), **opt))
    assert_maps_close(here.maps, there.maps, kappas(env, crops, local_store))
    assert [p["images"] for p in here.curve.points] == [p["images"] for p in there.curve.points]
    for p, q in zip(here.curve.points, there.curve.points, strict=True):
        np.testing.assert_allclose(np.array(q["r2"], float), np.array(p["r2"], float),
                                   rtol=1e-6, atol=1e-6)
    for key, mtx in here.similarity.measures().items():
        np.testing.assert_allclose(there.similarity.measures()[key], mtx, rtol=1e-9, atol=1e-9,
                                   err_msg=key)
