"""Maps file format: round trip, metadata, folded heads, corrupt files and missing pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet, fold_head, load_maps, save_maps


def _maps(rng) -> list[AffineMap]:
    return [AffineMap("a", "b", rng.normal(size=(4, 3)).astype(np.float32),
                      rng.normal(size=4).astype(np.float32), "ols",
                      {"images": 10, "residual": 0.5, "r2_holdout": 0.9}),
            AffineMap("b", "a", rng.normal(size=(3, 4)).astype(np.float32),
                      rng.normal(size=3).astype(np.float32), "ols",
                      {"images": 10, "residual": 0.25, "r2_holdout": None})]


def test_round_trip_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    maps = _maps(rng)
    p = save_maps(tmp_path / "m.safetensors", MapSet(maps), {"method": "ols", "seed": 0})
    ms = load_maps(p)
    assert set(ms) == {("a", "b"), ("b", "a")}
    assert ms.models == ["a", "b"]
    assert ms.meta["models"] == {"a": {"feature_dim": 3}, "b": {"feature_dim": 4}}
    assert ms.meta["pairs"]["a->b"] == {"method": "ols", "images": 10, "residual": 0.5,
                                        "r2_holdout": 0.9}
    m = ms["a", "b"]
    np.testing.assert_array_equal(m.weight, maps[0].weight)
    np.testing.assert_array_equal(m.bias, maps[0].bias)
    assert m.method == "ols"
    assert m.stats["r2_holdout"] == 0.9
    x = rng.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(m(x), x @ maps[0].weight.T + maps[0].bias, rtol=1e-6)
    # the folded head is W_dst·W and W_dst·b + b_dst in float64
    wd, bd = rng.normal(size=(5, 4)), rng.normal(size=5)
    folded = fold_head(m, Head(wd, bd))
    fw, fb = folded.weight, folded.bias
    np.testing.assert_allclose(x @ fw.T + fb, (x @ m.weight.T + m.bias) @ wd.T + bd, rtol=1e-5)


def test_missing_pair_and_bad_files(tmp_path):
    p = save_maps(tmp_path / "m.safetensors", MapSet(_maps(np.random.default_rng(1))[:1]))
    ms = load_maps(p)
    with pytest.raises(AffeqError, match="no map b->a"):
        ms["b", "a"]
    with pytest.raises(AffeqError, match="does not exist"):
        load_maps(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p.read_bytes()[:50])
    with pytest.raises(AffeqError, match="corrupt"):
        load_maps(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(AffeqError, match="without affeq-rt metadata"):
        load_maps(foreign)
    lost = tmp_path / "lost.safetensors"
    save_file({"a->b.weight": np.zeros((2, 2), np.float32)}, str(lost),
              metadata={"affeq_rt": json.dumps({"format": 1, "pairs": {"a->b": {}}})})
    with pytest.raises(AffeqError, match="lacks its tensors"):
        load_maps(lost)


def test_nan_map_is_refused(tmp_path):
    m = _maps(np.random.default_rng(2))[0]
    m.weight[0, 0] = np.nan
    with pytest.raises(AffeqError, match="NaN"):
        save_maps(tmp_path / "m.safetensors", MapSet([m]))
    assert not (tmp_path / "m.safetensors").exists()


def test_mapset_is_the_one_type(tmp_path):
    """A MapSet read from a file saves back to the same bytes (its metadata travels with it,
    the derived keys are recomputed); extra keys update it; only AffineMaps go in."""
    maps = MapSet(_maps(np.random.default_rng(3)), {"method": "ols", "source": {"n": 10}})
    first = save_maps(tmp_path / "1.safetensors", maps)
    again = save_maps(tmp_path / "2.safetensors", load_maps(first))
    assert first.read_bytes() == again.read_bytes()
    tagged = load_maps(save_maps(tmp_path / "3.safetensors", load_maps(first), {"demo": "x"}))
    assert tagged.meta["demo"] == "x"
    assert tagged.meta["source"] == {"n": 10}
    assert ("a", "b") in maps
    assert ("a", "c") not in maps
    assert len(maps) == 2
    with pytest.raises(InternalError, match="AffineMap"):
        MapSet([(np.zeros((2, 2)), np.zeros(2))])
    with pytest.raises(AffeqError, match="no maps to save"):
        save_maps(tmp_path / "4.safetensors", MapSet([]))
