"""A hybrid whose metadata lies about its input, or records NaN normalisation (issue 23): one
line naming the file (exit 1), never a traceback from onnxruntime or ``nan%`` predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_hybrid import TinyParts

    base = tmp_path_factory.mktemp("lying")
    return TinyParts(base / "parts").build(base / "h.onnx")


def edited(src: Path, out: Path, **changes: object) -> Path:
    """A copy of ``src`` whose ``affeq_rt.preprocessing`` record has ``changes``."""
    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == "affeq_rt.preprocessing":
            rec = json.loads(prop.value)
            rec.update(changes)
            prop.value = json.dumps(rec)  # json writes NaN as NaN, as a forged file may
    onnx.save(model, str(out))
    return out


def predict_cli(model: Path, image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "predict", str(model),
                           str(image)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("changes", "message"), [
    ({"input_size": 64}, "says input 'image' is float ['N', 3, 64, 64], the graph takes image "
                         "FLOAT ['N', 3, 32, 32]"),
    ({"in_graph": True}, "says input 'image' is UINT8 ['N', 32, 32, 3]"),
    ({"input": "pixels"}, "says input 'pixels'"),
    ({"input_size": "big"}, "input_size 'big' is not a number"),
])
def test_metadata_that_lies_about_the_input(hybrid: Path, tmp_path: Path, photo_files,
                                            changes: dict, message: str) -> None:
    from affeq_rt.deploy.metadata import read_metadata
    from affeq_rt.errors import AffeqError

    bad = edited(hybrid, tmp_path / "lie.onnx", **changes)
    with pytest.raises(AffeqError, match="rebuild it") as err:
        read_metadata(bad)
    assert message in str(err.value)
    res = predict_cli(bad, photo_files["chelsea"])
    assert res.returncode == 1, res.stderr[-2000:]
    assert message in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("field", ["mean", "std"])
def test_nan_normalisation_is_refused(hybrid: Path, tmp_path: Path, photo_files,
                                      field: str) -> None:
    bad = edited(hybrid, tmp_path / "nan.onnx", **{field: [float("nan"), 0.5, 0.5]})
    res = predict_cli(bad, photo_files["chelsea"])
    assert res.returncode == 1, (res.stdout[-2000:], res.stderr[-2000:])
    assert "nan%" not in res.stdout
    assert f"{bad} preprocessing metadata" in res.stderr
    assert "Traceback" not in res.stderr


def test_an_honest_hybrid_still_reads(hybrid: Path) -> None:
    from affeq_rt.deploy.metadata import hybrid_preprocessing, read_metadata

    pre, in_graph = hybrid_preprocessing(read_metadata(hybrid)["metadata"], hybrid)
    assert (pre.input_size, in_graph) == (32, False)
