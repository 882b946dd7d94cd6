"""Ctrl-C during ``extract`` and ``fit``: stops within seconds, one line, exit 130, and the rerun
resumes to a byte-identical result.

The signal goes to the whole process group, as a terminal's Ctrl-C does: the decode workers get
it too (issue 10 item 3: they died of it and the main process waited for them forever).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
import photos  # noqa: E402

MODELS = photos.E2E_MODELS
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos

#: Ctrl-C must end the run within this many seconds (issue 10: "within a second or two"; the
#: margin covers a 2-core CI machine busy with the other test process).
STOP_WITHIN_S = 5.0


def _cli(env: dict, out: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "affeq_rt.cli.main", "extract", "--models", ",".join(MODELS),
            "--data", str(env["photos"]), "--out", str(out), "--random-weights",
            "--export-root", env["exports"], "--batch-size", "2", "--workers", str(workers),
            "--dtype", "float32", "--commit-every", "0"]


def _fit_cli(env: dict, out: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "affeq_rt.cli.main", "fit", "--models", ",".join(MODELS[:2]),
            "--data", str(env["photos"]), "--out", str(out), "--random-weights",
            "--export-root", env["exports"], "--batch-size", "2", "--workers", str(workers),
            "--checkpoint-every", "2", "--method", "ridge", "--quiet"]


def _sigint_when(proc: subprocess.Popen, progress: Path, at_least: int,
                 timeout: float = 120.0) -> float:
    """SIGINT ``proc``'s process group once ``progress`` counts ``at_least`` samples; return
    the seconds the process took to exit after the signal."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            v = int(json.loads(progress.read_text())["samples"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            v = -1
        if v >= at_least:
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError("extract still running 60 s after Ctrl-C") from None
            return time.monotonic() - sent
        if proc.poll() is not None:
            raise AssertionError(f"finished before Ctrl-C: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("no progress to interrupt at")


def test_ctrl_c_mid_extract_stops_then_resumes_identically(env, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    r = subprocess.run(_cli(env, ref, workers=0), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_cli(env, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    took = _sigint_when(proc, out / "progress.json", 4)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 130, err[-2000:]
    print(f"stopped {took:.2f} s after Ctrl-C")
    assert took < STOP_WITHIN_S, took
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "interrupted; rerun the same command to resume"], err
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    r = subprocess.run(_cli(env, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from image" in r.stdout
    for f in ["images.txt", "labels.npy"] + [f"{m}/features.npy" for m in MODELS]:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert not (out / "progress.json").exists()


def test_ctrl_c_mid_fit_stops_then_resumes_identically(env, tmp_path: Path) -> None:
    ref = tmp_path / "ref.safetensors"
    r = subprocess.run(_fit_cli(env, ref, workers=0), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "interrupted.safetensors"
    proc = subprocess.Popen(_fit_cli(env, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    took = _sigint_when(proc, Path(f"{out}.partial") / "fit.json", 4)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    print(f"stopped {took:.2f} s after Ctrl-C")
    assert proc.returncode == 130, err[-2000:]
    assert took < STOP_WITHIN_S, took
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "interrupted; rerun the same command to resume"], err
    assert not out.exists()
    r = subprocess.run(_fit_cli(env, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from image" in r.stdout
    assert out.read_bytes() == ref.read_bytes()
    assert not Path(f"{out}.partial").exists()
