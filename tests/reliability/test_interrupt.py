"""Ctrl-C during ``extract`` and ``fit``: stops within 2 s with one line and exit 130, and the
rerun resumes to a byte-identical result (kill -9: ``test_extract.py`` and ``test_fit.py``).
SIGTERM and SIGHUP stop the same way (exit 143/129); a stop signal while the command line is
still loading its modules is the same one line, never a traceback.

The signal goes to the whole process group, as a terminal's Ctrl-C does (issue 10 item 3: the
decode workers died of it and the main process waited for them forever; issue 23: a group SIGTERM
hung ``Pool.terminate``); the decode processes, captured by pid before the signal, must be gone
when the command has stopped. Each command is interrupted at several points (counted in samples
committed so far); the uninterrupted reference runs once per module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from affeq_rt.cli.signals import stop_line

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
import photos  # noqa: E402
from procs import alive, children  # noqa: E402

MODELS = photos.E2E_MODELS
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos

#: Ctrl-C must end the run within this many seconds (issue 10: "within a second or two").
#: Measured 0.5–0.7 s on a 2-core machine shared with five other test processes: the main
#: process stops at the next batch boundary and the workers ignore SIGINT.
STOP_WITHIN_S = 2.0


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


def _signal_when(proc: subprocess.Popen, progress: Path, at_least: int, sig: int,
                 timeout: float = 120.0, group: bool = True
                 ) -> tuple[float, list[int], list[int]]:
    """Send ``sig`` to ``proc``'s process group (or to ``proc`` alone) once ``progress`` counts
    ``at_least`` samples; (the seconds the process took to exit after the signal, the processes
    it had started, read just before the signal, those of them still running the moment it
    exited: a loader reaps its decode processes before it exits, so no grace; read before
    anything waits on its output, which they may hold open)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            rec = json.loads(progress.read_text())  # a store's progress.json or a pass.json
            v = int(rec["samples"] if "samples" in rec else rec["done"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            v = -1
        if v >= at_least:
            started = children(proc.pid)
            sent = time.monotonic()
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError("still running 60 s after the signal") from None
            took = time.monotonic() - sent
            return took, started, alive(started)
        if proc.poll() is not None:
            raise AssertionError(f"finished before the signal: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("no progress to interrupt at")


def _group_gone(pgid: int, within: float = STOP_WITHIN_S) -> bool:
    """Whether every process of group ``pgid`` (the decode workers too) has exited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def _interrupt(cmd: list[str], progress: Path, at_least: int, sig: int,
               group: bool = True, workers: int = 2) -> tuple[int, str]:
    """Run ``cmd`` in its own process group and send ``sig`` at ``at_least`` samples: (exit
    code, stderr); Ctrl-C, SIGTERM and SIGHUP are asserted to stop it within ``STOP_WITHIN_S``
    with one line, 128 + the signal, and neither a process of the group nor any of its
    ``workers`` decode processes left behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    took, started, left = _signal_when(proc, progress, at_least, sig, group=group)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    print(f"stopped {took:.2f} s after {signal.Signals(sig).name} at {at_least} samples")
    assert proc.returncode == 128 + sig, err[-2000:]
    assert took < STOP_WITHIN_S, took
    assert "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [stop_line(sig)], err
    assert len(started) == workers, f"expected {workers} decode processes, saw {started}"
    assert left == [], f"decode processes {left} outlived the run"
    assert _group_gone(proc.pid), "a process of the command's group outlived it"
    return proc.returncode, err


@pytest.fixture(scope="module")
def ref_store(env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted extraction (decoded in this process)."""
    ref = tmp_path_factory.mktemp("ref") / "store"
    r = subprocess.run(_cli(env, ref, workers=0), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return ref


@pytest.fixture(scope="module")
def ref_maps(env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted fit (decoded in this process)."""
    ref = tmp_path_factory.mktemp("ref") / "maps.safetensors"
    r = subprocess.run(_fit_cli(env, ref, workers=0), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return ref


def _resume_extract(env: dict, out: Path, ref: Path) -> None:
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    r = subprocess.run(_cli(env, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from image" in r.stdout
    for f in ["images.txt", "labels.npy"] + [f"{m}/features.npy" for m in MODELS]:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert not (out / "progress.json").exists()


def _resume_fit(env: dict, out: Path, ref: Path) -> None:
    assert not out.exists()
    r = subprocess.run(_fit_cli(env, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from image" in r.stdout
    assert out.read_bytes() == ref.read_bytes()
    assert not Path(f"{out}.partial").exists()


SLOW = pytest.mark.slow


@pytest.mark.parametrize("at", [4, pytest.param(0, marks=SLOW), pytest.param(14, marks=SLOW)])
def test_ctrl_c_mid_extract_stops_then_resumes_identically(env, ref_store: Path, at: int,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    _interrupt(_cli(env, out), out / "progress.json", at, signal.SIGINT)
    _resume_extract(env, out, ref_store)


@SLOW
def test_ctrl_c_under_load_stops_within_2_s(env, ref_store: Path, tmp_path: Path) -> None:
    """Ctrl-C with every usable CPU kept busy by a process of the same priority (a spinning
    Python, one per CPU) still stops within ``STOP_WITHIN_S`` (issue 23: 2.6-3.4 s under load).

    The bound, argued: after the signal the command does ~0.1 s of its own work (the handler,
    killing the decode processes, the stop line: measured +0.01-0.07 s on a 2-core machine whose
    load average was 12-16 from other users) and then the interpreter's own finalisation
    (0.3-0.45 s there); measured unloaded, 0.4-0.6 s in all. The kernel's fair scheduler shares
    each core among the runnable tasks, so one busy process per CPU at most halves the
    command's share: <= 1.2 s, under 2 s with room for the machine's other load (measured with
    two busy processes on 2 cores: median 0.74 s, max 2.0 s in 10 runs at load 16; median
    0.43 s, max 0.52 s at load 6-8, where the multiprocessing.Pool loader took 0.52 / 0.64 s)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.5)  # the hogs are running
        out = tmp_path / "loaded"
        _interrupt(_cli(env, out), out / "progress.json", 4, signal.SIGINT)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    _resume_extract(env, out, ref_store)


@pytest.mark.parametrize("at", [4, pytest.param(12, marks=SLOW)])
def test_ctrl_c_mid_fit_stops_then_resumes_identically(env, ref_maps: Path, at: int,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "interrupted.safetensors"
    _interrupt(_fit_cli(env, out), Path(f"{out}.partial") / "pass.json", at, signal.SIGINT)
    _resume_fit(env, out, ref_maps)


@pytest.mark.parametrize("group", [False, True], ids=["process", "group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=SLOW)])
def test_sigterm_and_sighup_stop_like_ctrl_c(env, ref_store: Path, sig: int, group: bool,
                                             tmp_path: Path) -> None:
    """SIGTERM/SIGHUP (``kill PID``; a service manager or a closed terminal signals the whole
    group): one line, 128 + the signal, no worker left, and the rerun resumes to the same bytes
    (issue 23: a traceback, and decode workers' BrokenPipe tracebacks).

    The group case is stopped at three points: with ``multiprocessing.Pool`` workers, a group
    SIGTERM killed the idle worker that holds the task queue's lock while it waits for a task,
    and ``Pool.terminate`` then waited for that lock forever. That hung 18 of 20 runs of this
    command here (so three stops all miss it with probability ~1e-3), 0 of 20 since."""
    points = [2, 4, 8] if group else [4]
    for at in points:
        out = tmp_path / f"stopped{at}"
        _interrupt(_cli(env, out), out / "progress.json", at, sig, group=group)
    _resume_extract(env, out, ref_store)


def _caught(pid: int) -> set[int]:
    """The signals process ``pid`` has a handler for (``SigCgt`` of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return set()
    return {s for s in range(1, 65) if mask >> (s - 1) & 1}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("after", [0.0, 0.15, 0.4])
def test_a_stop_while_the_command_line_loads_is_one_line(env, tmp_path: Path, sig: int,
                                                         after: float) -> None:
    """From the moment affeq-rt's first module runs (its SIGHUP handler is in place: the
    interpreter's own start-up, before that, is out of any program's reach), a stop signal is
    the one line and 128 + the signal (issue 23: a Ctrl-C in the first second printed a
    KeyboardInterrupt traceback from deep inside an import)."""
    proc = subprocess.Popen(_cli(env, tmp_path / "store"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.monotonic()
    while signal.SIGHUP not in _caught(proc.pid) and proc.poll() is None:
        assert time.monotonic() - t0 < 60, "affeq-rt never installed its handlers"
        time.sleep(0.001)
    time.sleep(after)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("still running 60 s after the signal") from None
    assert "Traceback" not in err, err
    assert proc.returncode == 128 + sig, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [stop_line(sig)], err
    assert not (tmp_path / "store" / "manifest.json").exists() or not json.loads(
        (tmp_path / "store" / "manifest.json").read_text())["complete"]
