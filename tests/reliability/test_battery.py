"""The reliability battery (issue 10): bad inputs through the command line, as a user meets them.

Each case builds its input in a fresh folder, runs ``affeq-rt`` in this process
(``affeq_rt.cli.main.main``) and asserts the exit code, exactly one line on stderr (``error:
problem; fix``, never a traceback) naming what is wrong, and that nothing was written: the
folder holds exactly the files the case made, and no export was started. The server's
malformed and oversized requests are the ``MALFORMED`` table of ``tests/test_serve.py`` (they
need a running server); Ctrl-C is ``test_interrupt.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from affeq_rt.cli.main import main

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
import photos  # noqa: E402

TENCH, TABBY = "n01440764", "n02123045"


def _photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photos.photo_images()[0][1].resize((64, 48)).save(path)
    return path


def _line_png(d: Path) -> list[str]:
    """The issue's 118-byte 1×20000 PNG (5.3 GB and 110 s in predict before the fix)."""
    Image.new("L", (1, 20000), 128).save(d / "line.png")
    return ["predict", "mobilenet_v2", str(d / "line.png")]


def _bomb_png(d: Path) -> list[str]:
    """A decompression bomb (PIL's limit is lowered by the case, so the file stays small)."""
    Image.new("RGB", (300, 300)).save(d / "bomb.png")
    return ["predict", "mobilenet_v2", str(d / "bomb.png")]


def _extract(d: Path, data: Path, *extra: str) -> list[str]:
    return ["extract", "--models", "mobilenet_v2", "--data", str(data), "--out", str(d / "out"),
            "--random-weights", "--workers", "0", *extra]


def _kaggle(d: Path, explicit: bool) -> list[str]:
    """One unknown wnid among Kaggle val rows (before: every label silently re-indexed)."""
    for i in range(3):
        _photo(d / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    wnids = [TENCH, "n99999999", TABBY]
    rows = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4"
                                           for i, w in enumerate(wnids)]
    (d / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    extra = ["--labels", str(d / "LOC_val_solution.csv")] if explicit else []
    return _extract(d, d / "val", *extra)


def _mixed_folders(d: Path) -> list[str]:
    """ImageNet class folders plus one that is not a wnid (before: folder-name order)."""
    _photo(d / "train" / TENCH / "a.jpg")
    _photo(d / "train" / "misc" / "b.jpg")
    return _extract(d, d / "train")


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it (returns the command line), what the user must read."""

    name: str
    make: Callable[[Path], list[str]]
    code: int
    message: str
    bomb_limit: int | None = None  # PIL.Image.MAX_IMAGE_PIXELS for the case


CASES = [
    Case("image 1x20000 png", _line_png, 1, "line.png is 1×20000 pixels"),
    Case("decompression bomb", _bomb_png, 1, "bomb.png is too large to decode safely",
         bomb_limit=300 * 300 // 4),
    Case("kaggle csv unknown wnid (found)", lambda d: _kaggle(d, False), 1,
         "line 3 (ILSVRC2012_val_00000002: 'n99999999')"),
    Case("kaggle csv unknown wnid (--labels)", lambda d: _kaggle(d, True), 1,
         "line 3 (ILSVRC2012_val_00000002: 'n99999999')"),
    Case("wnid and other class folders", _mixed_folders, 1, "not ImageNet-1k wnids ('misc')"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    exports = tmp_path / "exports"
    monkeypatch.setenv("AFFEQ_RT_HOME", str(tmp_path / "home"))
    args = [*case.make(work), "--export-root", str(exports)]
    if case.bomb_limit is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", case.bomb_limit)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == case.code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert case.message in lines[0], lines[0]
    # nothing half-written: the case's own files only, no export begun, no home cache
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    assert not exports.exists() or not any(exports.iterdir())
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.onnx"))
