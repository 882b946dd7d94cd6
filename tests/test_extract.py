"""End-to-end extraction on real photos with three networks; kill -9 and resume; bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.data.loader import iter_batches
from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError
from affeq_rt.io.store import FeatureStore
from affeq_rt.method.extract import (
    ExtractOptions,
    ImageOptions,
    extract,
    open_networks,
    run_network,
)

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402
from recording import RecordingProgress  # noqa: E402

MODELS = photos.E2E_MODELS


env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos


def _opts(env, **kw) -> ImageOptions:
    """Random-weight exports from the test cache; decoding in this process unless told."""
    return ImageOptions(**{"workers": 0, "random_weights": True, "export_root": env["exports"],
                           **kw})


@pytest.fixture(scope="module")
def ref_store(env):
    """An uninterrupted run: batch size 2, float32, in-process decoding."""
    rec = RecordingProgress()
    res = extract(MODELS, env["photos"], env["base"] / "ref",
                  options=ExtractOptions(dtype="float32"), images=_opts(env, batch_size=2),
                  progress=rec)
    res.progress_calls = rec.calls
    return res


def test_extract_three_networks_on_photos(env, ref_store):
    st = FeatureStore.open(ref_store.path)
    n_good = len(env["good"])
    assert st.n == n_good == ref_store.n
    assert st.models == MODELS
    # the unreadable files sit mid-list (samples 2 and 7), so every kill below crosses one
    assert [(s["index"], Path(s["path"]).name) for s in st.manifest["skipped"]] == \
        [(2, photos.CORRUPT), (7, photos.TRUNCATED)]
    assert st.images == [str(p) for p in env["good"]]
    assert st.labels is None  # a plain folder: unlabelled
    st.verify()
    nets = open_networks(MODELS, export_root=env["exports"], random_weights=True)
    for net in nets:
        f = st.features(net.name)
        assert f.dtype == np.float32
        assert f.shape == (n_good, net.dim)
        for i in (0, 2, 6, n_good - 1):  # the first, those right after each skipped file, the last
            # row i is image i alone through the loader's own preprocessing (whichever pipeline
            # it uses: test_preprocess.py holds the pipelines to timm's transform)
            batch = next(iter(iter_batches([Sample(st.images[i], -1)], [net.spec], batch_size=1,
                                           workers=0)))
            want = run_network(net, next(iter(batch.tensors.values())), 1)[0]
            # same graph, batch of 2 vs 1: ORT may pick other kernels/blockings (float32 noise)
            np.testing.assert_allclose(f[i], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        head = st.head(net.name)
        assert head.weight.shape == (1000, net.dim)
        assert head.bias.shape == (1000,)
    # running the same command again finds the store complete
    again = extract(MODELS, env["photos"], ref_store.path, options=ExtractOptions(dtype="float32"),
                    images=_opts(env, batch_size=2))
    assert again.already_complete
    # progress: one task over every sample (readable or not), in batches of 2; the rate is
    # this run's images over the run's own timestamps (the same seconds: equal up to rounding)
    calls = ref_store.progress_calls
    assert calls[0] == ("start", "extract", n_good + 2, 0, "img")
    assert calls[-1] == ("done",)
    assert [c[1] for c in calls[1:-1]] == [2] * ((n_good + 2) // 2) + [1] * ((n_good + 2) % 2)
    assert ref_store.images_per_s == pytest.approx((n_good + 2) / ref_store.seconds, rel=1e-12)


def _cli(env, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "affeq_rt.cli.main", "extract", "--models", ",".join(MODELS),
            "--data", str(env["photos"]), "--out", str(out), "--random-weights",
            "--export-root", env["exports"], "--batch-size", "2", "--workers", "1",
            "--dtype", "float32", "--commit-every", "0", *extra]


def _kill_when(proc: subprocess.Popen, progress: Path, key: str, at_least: int,
               timeout: float = 120.0) -> int:
    """SIGKILL ``proc`` once ``progress``'s ``key`` reaches ``at_least``; return that value."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = int(json.loads(progress.read_text())[key])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            v = -1
        if v >= at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return v
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no progress to kill at")


def test_kill9_mid_extract_then_resume_is_identical(env, ref_store):
    out = env["base"] / "killed"
    proc = subprocess.Popen(_cli(env, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ})
    done = _kill_when(proc, out / "progress.json", "samples", 4)
    assert proc.returncode == -signal.SIGKILL
    # past the corrupt sample 2: the committed rows trail the samples, so a resume that
    # restarted at the row count would shift every later row
    prog = json.loads((out / "progress.json").read_text())
    assert prog["rows"] < prog["samples"] == done
    man = json.loads((out / "manifest.json").read_text())
    assert not man["complete"]
    assert done < 23
    with pytest.raises(AffeqError, match="unfinished"):
        FeatureStore.open(out)
    # resume, and kill the resumed run too, later on
    proc = subprocess.Popen(_cli(env, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ})
    later = _kill_when(proc, out / "progress.json", "samples", done + 6)
    assert done < later < 23
    prog = json.loads((out / "progress.json").read_text())
    assert prog["rows"] == later - 2  # both unreadable files (samples 2 and 7) crossed
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    r = subprocess.run(_cli(env, out), capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from image" in r.stdout
    for f in ["images.txt", "labels.npy"] + [f"{m}/features.npy" for m in MODELS]:
        assert (out / f).read_bytes() == (ref_store.path / f).read_bytes(), f
    assert not (out / "progress.json").exists()


def test_bad_inputs(env, ref_store, tmp_path):
    with pytest.raises(AffeqError, match="different feature store.*models"):
        extract(MODELS[:2], env["photos"], ref_store.path, images=_opts(env, batch_size=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AffeqError, match="no images"):
        extract(MODELS, tmp_path / "empty", tmp_path / "s", images=_opts(env, workers=2))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(AffeqError, match="none of the 1 images could be read"):
        extract(MODELS[:1], tmp_path / "junk", tmp_path / "sj",
                options=ExtractOptions(dtype="float32"), images=_opts(env))
    with pytest.raises(AffeqError, match="unknown model"):
        extract(["resnet_does_not_exist"], env["photos"], tmp_path / "s")
    # random-weight MobileNet features are ~1e-9: float16 would store zeros, so it is refused
    with pytest.raises(AffeqError, match="too small for float16"):
        extract(MODELS[:1], env["photos"], tmp_path / "f16",
                options=ExtractOptions(dtype="float16"), images=_opts(env))
    r = subprocess.run(_cli(env, tmp_path / "s2", "--max-images", "0"), capture_output=True,
                       text=True, env={**os.environ})
    assert r.returncode == 1
    assert r.stderr.startswith("error: --max-images")


@pytest.mark.slow  # ~20-40 s on 2 busy cores: a real-weight and a random-weight export
def test_random_control_is_a_network_of_its_own_in_the_same_pass(env, tmp_path):
    """``NAME~random`` (issue 22's random-weight control) is extracted beside NAME in one pass:
    its own export folder (NAME's real-weight export is not replaced), its own features, and a
    store spec that says its weights are random."""
    from affeq_rt.onnx.exported import ExportedBackbone

    net, ctl = "efficientnet_lite0", "efficientnet_lite0~random"
    opts = ImageOptions(workers=0, export_root=tmp_path / "ex")  # real weights (the package's)
    st = FeatureStore.open(extract([net, ctl], env["photos"], tmp_path / "s",
                                   options=ExtractOptions(dtype="float32"), images=opts).path)
    assert st.models == [net, ctl]
    assert st.spec(ctl)["name"] == ctl
    assert st.spec(ctl)["weights"] == {"kind": "none"}
    assert st.spec(net)["weights"]["kind"] == "package"
    real = ExportedBackbone(tmp_path / "ex" / net)
    rand = ExportedBackbone(tmp_path / "ex" / "random-weights" / net)
    assert real.manifest["weights"]["source"] != "random"
    assert rand.manifest["weights"]["source"] == "random"
    # trained and random features of the same images differ everywhere (not a copy of one)
    a, r = np.asarray(st.features(net)), np.asarray(st.features(ctl))
    assert a.shape == r.shape
    assert np.all(np.abs(a - r).max(1) > 0)
    # a second run reuses both exports (nothing re-exported: the folders keep their manifests)
    before = [p.stat().st_mtime_ns for p in (real.path / "manifest.json",
                                             rand.path / "manifest.json")]
    extract([net, ctl], env["photos"], tmp_path / "s2", options=ExtractOptions(dtype="float32"),
            images=opts)
    assert before == [p.stat().st_mtime_ns for p in (real.path / "manifest.json",
                                                     rand.path / "manifest.json")]
    with pytest.raises(AffeqError, match="only NAME~random has features"):
        extract([net, f"{net}~noise"], env["photos"], tmp_path / "s3", images=opts)
