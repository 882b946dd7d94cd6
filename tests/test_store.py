"""Feature store: write, commit, resume after a crash, finalise with skipped rows, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError
from affeq_rt.io.store import FeatureStore, StoreConfig, StoreWriter, _rewrite_npy_rows

DIMS = {"a": 5, "b": 3}


def _cfg(n: int, models=("a", "b"), dtype="float16") -> StoreConfig:
    return StoreConfig(models=list(models), dims={m: DIMS[m] for m in models},
                       specs={m: {"name": m, "label_offset": 0} for m in models},
                       exports={m: f"sha-{m}" for m in models},
                       data={"kind": "test", "n_samples": n, "fingerprint": f"fp{n}"},
                       dtype=dtype, batch_size=4)


def _heads():
    rng = np.random.default_rng(0)
    return {m: (rng.normal(size=(7, d)).astype(np.float32), rng.normal(size=7).astype(np.float32))
            for m, d in DIMS.items()}


def _feats(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in DIMS.items()}


def _run(path, samples, feats, bad, stop_after=None):
    """Write batches of 4 samples like extract does, from the writer's committed position;
    "crash" after ``stop_after`` commits, with the next batch's rows written but not committed."""
    w = StoreWriter(path, _cfg(len(samples)), _heads())
    rows = w.rows
    for b, start in enumerate(range(w.samples_done, len(samples), 4)):
        stop = min(start + 4, len(samples))
        good = [i for i in range(start, stop) if i not in bad]
        for m in DIMS:
            w.write(m, rows, feats[m][good])
        if stop_after is not None and b == stop_after:
            for arr in w._arrays.values():
                arr.flush()  # the uncommitted rows reach the file, as a kill may leave them
            return w
        rows += len(good)
        w.commit(stop, rows, [{"index": i, "path": samples[i].path, "reason": "corrupt"}
                              for i in range(start, stop) if i in bad])
    w.finalise(samples)
    return w


def test_write_resume_finalise(tmp_path):
    samples = [Sample(f"/img/{i}.jpg", i % 3) for i in range(10)]
    feats = _feats(10)
    bad = {2, 9}
    w = _run(tmp_path / "s", samples, feats, bad, stop_after=1)  # "crash" after one commit
    w.close()  # a crashed run's lock dies with its process (the kernel drops the flock)
    with pytest.raises(AffeqError, match="unfinished"):
        FeatureStore.open(tmp_path / "s")
    # the resumed writer starts at the commit (samples 0-3, sample 2 unreadable: 3 rows) ...
    r = StoreWriter(tmp_path / "s", _cfg(10), _heads())
    assert r.resumed
    assert (r.samples_done, r.rows) == (4, 3)
    assert not r.already_complete
    assert [s["index"] for s in r.skipped] == [2]
    del r
    # ... and keeps the committed rows: the rerun is fed different features for samples 0-3,
    # which a writer restarting from zero would store instead of the committed ones
    rerun = {m: f.copy() for m, f in feats.items()}
    for f in rerun.values():
        f[:4] = 99.0
    w2 = _run(tmp_path / "s", samples, rerun, bad)
    assert w2.already_complete
    st = FeatureStore.open(tmp_path / "s")
    keep = [i for i in range(10) if i not in bad]
    assert st.n == 8
    assert st.models == ["a", "b"]
    assert st.dtype == "float16"
    np.testing.assert_array_equal(st.features("a"), feats["a"][keep].astype(np.float16))
    assert np.load(tmp_path / "s" / "b" / "features.npy").shape == (8, 3)  # truncated file
    np.testing.assert_array_equal(st.labels, [samples[i].label for i in keep])
    assert st.images == [samples[i].path for i in keep]
    assert [s["index"] for s in st.manifest["skipped"]] == [2, 9]
    np.testing.assert_array_equal(st.head("a").weight, _heads()["a"][0])
    assert st.spec("b")["name"] == "b"
    assert st.feature_dim("a") == 5
    st.verify()
    del w
    # a store identical to an uninterrupted run, byte for byte
    _run(tmp_path / "u", samples, feats, bad)
    for f in ("a/features.npy", "b/features.npy", "labels.npy", "images.txt"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "u" / f).read_bytes()
    # running again on a complete store does nothing
    assert StoreWriter(tmp_path / "s", _cfg(10), _heads()).already_complete


def test_bad_inputs(tmp_path):
    samples = [Sample(f"/img/{i}.jpg", -1) for i in range(6)]
    _run(tmp_path / "s", samples, _feats(6), set())
    st = FeatureStore.open(tmp_path / "s")
    assert st.labels is None  # all unknown
    with pytest.raises(AffeqError, match="not in feature store"):
        st.features("c")
    with pytest.raises(AffeqError, match="different feature store.*models a"):
        StoreWriter(tmp_path / "s", _cfg(6, models=("b",)), _heads())
    with pytest.raises(AffeqError, match="different feature store"):
        StoreWriter(tmp_path / "s", _cfg(6, dtype="float32"), _heads())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(AffeqError, match="not a feature store"):
        StoreWriter(tmp_path / "other", _cfg(6), _heads())
    with pytest.raises(AffeqError, match="does not exist"):
        FeatureStore.open(tmp_path / "none")
    with pytest.raises(AffeqError, match="dtype"):
        StoreWriter(tmp_path / "x", _cfg(6, dtype="int8"), _heads())
    (tmp_path / "s" / "a" / "features.npy").write_bytes(b"garbage")  # caught on open, cheaply
    with pytest.raises(AffeqError, match=r"a/features.npy has 7 bytes, the manifest says.*again"):
        FeatureStore.open(tmp_path / "s")


def test_shrink_is_idempotent(tmp_path):
    p = tmp_path / "f.npy"
    a = np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(1000, 7))
    a[:] = np.arange(7000).reshape(1000, 7)
    a.flush()
    del a
    _rewrite_npy_rows(p, 998)
    _rewrite_npy_rows(p, 998)  # a rerun after a kill mid-finalise
    b = np.load(p)
    assert b.shape == (998, 7)
    assert b[-1, -1] == np.float16(998 * 7 - 1)


# ------------------------------------------------------------ issue 23: names and manifests

ODD_NAMES = ["plain.jpg", "new\nline.jpg", "line\u2028sep.jpg", "back\\nslash.jpg",
             os.fsdecode(b"latin1-\xe9.jpg"), "cr\r.jpg", "tab\t.jpg", "trail\\"]


def test_images_txt_holds_any_file_name(tmp_path):
    """A newline or U+2028 in a name shifted images.txt against the rows (issue 23); every
    name, non-UTF-8 bytes included, comes back exactly, one per row."""
    samples = [Sample(f"/img/{name}", i) for i, name in enumerate(ODD_NAMES)]
    _run(tmp_path / "s", samples, _feats(len(samples)), bad={2})
    st = FeatureStore.open(tmp_path / "s", verify=True)
    want = [s.path for i, s in enumerate(samples) if i != 2]
    assert st.images == want
    assert len(st.images) == st.n == len(samples) - 1


def _edited(tmp_path, edit) -> Path:
    """A complete store whose manifest ``edit`` changed."""
    path = tmp_path / "s"
    samples = [Sample(f"/img/{i}.jpg", i % 3) for i in range(6)]
    _run(path, samples, _feats(6), bad=set())
    man = json.loads((path / "manifest.json").read_text())
    edit(man)
    (path / "manifest.json").write_text(json.dumps(man))
    return path


def _outside(man: dict) -> None:
    """Rename network "a" to "../outside" everywhere, and plant features there."""
    man["models"][0] = "../outside"
    for key in ("feature_dims", "specs"):
        man[key]["../outside"] = man[key].pop("a")


@pytest.mark.parametrize(("edit", "says"), [
    (_outside, "network name '../outside' is not a folder of the store"),
    (lambda m: m["models"].__setitem__(0, "/etc"), "network name '/etc'"),
    (lambda m: m["checksums"].update({"/etc/passwd": "0" * 64}), "'/etc/passwd', a path outside"),
    (lambda m: m["checksums"].update({"../x": "0" * 64}), "'../x', a path outside"),
    (lambda m: m.update(n="many"), "'n' is 'many'"),
    (lambda m: m.update(models="a,b"), "'models' is not a list"),
    (lambda m: m["feature_dims"].update(a="5"), "'feature_dims' of a is '5'"),
    (lambda m: m["specs"]["b"].update(label_offset="one"), "label_offset of b"),
    (lambda m: m.update(dtype="int8"), "'dtype' is 'int8'"),
    (lambda m: m.pop("specs"), "'specs' is not an object"),
])
def test_edited_manifest_is_one_error_and_nothing_outside_is_read(tmp_path, edit, says):
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "features.npy", np.zeros((6, 5), np.float16))
    path = _edited(tmp_path, edit)
    with pytest.raises(AffeqError, match="edited or corrupt manifest.json") as e:
        FeatureStore.open(path, verify=True)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_store_begun_with_relative_data_resumes_with_its_absolute_path(tmp_path, monkeypatch):
    """The data fingerprint is over absolute paths: ``--data photos`` and ``--data
    /abs/photos`` are the same data (a resume used to be refused as a different store)."""
    from affeq_rt.data.readers import discover

    (tmp_path / "photos").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "photos" / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    rel, absolute = discover("photos"), discover(tmp_path / "photos")
    assert [s.path for s in rel.samples] != [s.path for s in absolute.samples]
    assert rel.fingerprint() == absolute.fingerprint()
    (tmp_path / "photos" / "c.png").write_bytes(b"x")
    assert discover("photos").fingerprint() != rel.fingerprint()


def test_a_store_is_never_resumed_with_another_image_pipeline(tmp_path):
    """The image pipeline (exact, fast, …) is part of a store's identity: rows decoded one way must
    not be continued another way (a resume on a machine without torchvision would mix them)."""
    samples = [Sample(f"/img/{i}.jpg", i % 3) for i in range(10)]
    w = _run(tmp_path / "s", samples, _feats(10), set(), stop_after=1)
    w.close()
    other = _cfg(10)
    other.pipeline = "pillow"
    with pytest.raises(AffeqError, match="pipeline differ"):
        StoreWriter(tmp_path / "s", other, _heads())
    assert StoreWriter(tmp_path / "s", _cfg(10), _heads()).resumed  # the same pipeline resumes
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["pipeline"] == "exact"
