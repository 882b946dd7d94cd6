"""Stage extraction (issue 26 item 2): every network's pooled stages into one feature store, each
image decoded once, on the engine; an interrupted run resumes to the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import affeq_rt.data.loader as loader
from affeq_rt.io.store import FeatureStore
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
from affeq_rt.method.stages import network_models
from affeq_rt.onnx.stages import list_stages
from affeq_rt.registry.spec import get_spec

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402

MODELS = ["mobilenet_v2", "efficientnet_lite0"]
env = photos.e2e_env  # module-scoped: small-input registry, cached random exports, 23 photos


def _opts(env, **kw) -> ImageOptions:
    return ImageOptions(**{"workers": 0, "random_weights": True, "export_root": env["exports"],
                           "batch_size": 2, **kw})


@pytest.fixture(scope="module")
def stage_store(env):
    """An uninterrupted stage extraction, counting image decodes."""
    calls: list[str] = []
    real = loader.prepare_crops

    def counted(path, *a, **k):
        calls.append(path)
        return real(path, *a, **k)

    loader.prepare_crops = counted
    try:
        res = extract(MODELS, env["photos"], env["base"] / "stages",
                      options=ExtractOptions(dtype="float32", stages=True), images=_opts(env))
    finally:
        loader.prepare_crops = real
    return res, calls


def test_one_decode_per_image_and_every_stage_stored(env, stage_store):
    res, calls = stage_store
    store = FeatureStore.open(res.path)
    n_files = len(sorted(p for p in Path(env["photos"]).iterdir() if p.is_file()))
    assert len(calls) == n_files == len(set(calls))  # 2 networks × 11 stages: one decode each
    specs = {m: store.spec(m) for m in store.models}
    for net in MODELS:
        stages = list_stages(get_spec(net))
        assert network_models(store.models, specs, net) == \
            [f"{net}@{s.name}" for s in stages] + [net]
        for s in stages:
            assert store.feature_dim(f"{net}@{s.name}") == s.dim
    assert store.n == n_files - 2  # the two corrupt photos have no row


def test_network_rows_are_its_features(env, stage_store, tmp_path):
    """A network's rows in a stage store are its features: equal to an ordinary extraction's
    (another graph of the same weights: 1e-4 relative, argued in tests/test_stages.py), and for
    MobileNetV2, whose features are the average pool of its last stage, equal to that stage's."""
    res, _ = stage_store
    st = FeatureStore.open(res.path)
    plain = FeatureStore.open(extract(MODELS, env["photos"], tmp_path / "plain",
                                      options=ExtractOptions(dtype="float32"),
                                      images=_opts(env)).path)
    for m in MODELS:
        a, b = np.asarray(st.features(m), np.float64), np.asarray(plain.features(m), np.float64)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    last = np.asarray(st.features("mobilenet_v2@s5"), np.float64)
    feats = np.asarray(st.features("mobilenet_v2"), np.float64)
    assert np.abs(last - feats).max() <= 1e-4 * np.abs(feats).max()
    assert not st.head("mobilenet_v2@s3").weight.any()  # a stage has no classifier
    assert st.head("mobilenet_v2").weight.any()


SCRIPT = """
import os, sys
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract

class Die:
    seen = 0
    def start(self, *a, **k): pass
    def step(self, *a, **k): pass
    def done(self): pass
    def advance(self, n=1):
        Die.seen += n
        if Die.seen >= int(sys.argv[3]):
            os._exit(9)  # as a kill: no cleanup

extract({models!r}, sys.argv[1], sys.argv[2],
        options=ExtractOptions(dtype="float32", commit_every=0.0, stages=True),
        images=ImageOptions(workers=0, random_weights=True, export_root={root!r}, batch_size=2),
        progress=Die())
"""


def test_killed_stage_extraction_resumes_to_the_same_bytes(env, stage_store, tmp_path):
    res, _ = stage_store
    out = tmp_path / "killed"
    script = SCRIPT.format(models=MODELS, root=env["exports"])
    for stop in (7, 15):  # past the corrupt photos 2 and 7, then again later
        r = subprocess.run([sys.executable, "-c", script, str(env["photos"]), str(out),
                            str(stop)], capture_output=True, text=True, env={**os.environ})
        assert r.returncode == 9, r.stderr[-2000:]
        assert (out / "progress.json").is_file()
    again = extract(MODELS, env["photos"], out,
                    options=ExtractOptions(dtype="float32", stages=True), images=_opts(env))
    assert again.resumed_from > 0
    ref = FeatureStore.open(res.path)
    for f in ["images.txt", "labels.npy"] + [f"{m}/features.npy" for m in ref.models]:
        if (res.path / f).exists():
            assert (out / f).read_bytes() == (res.path / f).read_bytes(), f


def test_whole_two_network_analysis_decodes_each_image_once(env, stage_store, monkeypatch):
    """Stage extraction, then CKA and both depth curves: the analysis is one pass over stored
    rows, so the images were decoded once each in all (photos have no labels: agreement)."""
    import affeq_rt.method.depth as depth
    from affeq_rt.method.fit import FitOptions

    res, calls = stage_store
    after: list[str] = []
    passes: list[str] = []
    real, real_pass = loader.prepare_crops, depth.run_pass
    monkeypatch.setattr(loader, "prepare_crops",
                        lambda path, *a, **k: after.append(path) or real(path, *a, **k))
    monkeypatch.setattr(depth, "run_pass",
                        lambda rows, *a, **k: passes.append(type(rows).__name__) or
                        real_pass(rows, *a, **k))
    la = depth.layer_analysis(res.path, *MODELS, options=FitOptions(holdout=0.3))
    assert after == []
    assert passes == ["StoreSource"]
    assert len(calls) == len(set(calls)) == len(list(Path(env["photos"]).iterdir()))
    assert [c.metric for c in la.curves] == ["agreement", "agreement"]
    assert la.cka.shape == (12, 12)
