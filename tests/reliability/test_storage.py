"""Storage faults (issue 10, classes 6, 7, 10, 12, 14): a full disk, a failed run that poisoned the
next one, tampered artefacts, two runs on one output, leftovers of killed runs and file modes.

Each test runs the commands as a user would (``affeq-rt …`` through ``cli.main.main`` in this
process, or a real subprocess where a process must die) on the small e2e registry (96-pixel
inputs, random weights, cached exports). Full disks are real: a 2 MB tmpfs mounted by the test
(skipped, with the reason, where mounting is not permitted), plus injected ENOSPC at the system
call so that a machine without mounts still checks the message.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cli.main import main
from affeq_rt.errors import AffeqError
from affeq_rt.io import fsio
from affeq_rt.io.store import FeatureStore, StoreConfig, StoreWriter

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
import photos  # noqa: E402

env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos
A, B = photos.E2E_MODELS[0], photos.E2E_MODELS[1]
LOCK_FILE = ".affeq-rt.lock"  # fsio.LOCK_FILE, spelled out so this file imports without it
SPACE_LINE = re.compile(r"^error: no space left on device writing \S+; need (about|more than) "
                        r"[\d.]+ MB free, have [\d.]+ MB; ")
FULL_LINE = re.compile(r"^error: not enough space for .+: need about [\d.]+ MB free, have "
                       r"[\d.]+ MB; ")


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``affeq-rt ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    """The single ``error: …`` line a user error prints (never a traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _extract(env: dict, out: Path, data: Path | None = None, *extra: str) -> list[str]:
    return ["extract", "--models", A, "--data", data or env["photos"], "--out", out,
            "--random-weights", "--export-root", env["exports"], "--workers", "0",
            "--dtype", "float32", "--quiet", *extra]


def _hidden(folder: Path) -> list[str]:
    """Leftovers a user would not see: hidden entries, the lock file excepted."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and p.name != LOCK_FILE)


# ---------------------------------------------------------------------------------------------
# 6. a full disk


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 2 MB tmpfs mounted for the test (skipped where this process may not mount)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system for the ENOSPC test")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the injected-ENOSPC tests still check the message")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> None:
    """Use up ``mnt`` until only about ``leave`` bytes are free."""
    with open(mnt / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(shutil.disk_usage(mnt).free - leave, 1))


def _store_cfg(n: int) -> tuple[StoreConfig, dict]:
    cfg = StoreConfig(models=["a"], dims={"a": 1000}, specs={"a": {"name": "a"}},
                      exports={"a": "sha"}, data={"n_samples": n, "fingerprint": "fp"},
                      dtype="float32", batch_size=4)
    heads = {"a": (np.zeros((3, 1000), np.float32), np.zeros(3, np.float32))}
    return cfg, heads


def test_preallocation_enospc_is_one_line_not_sigbus(tmp_path: Path, monkeypatch) -> None:
    """Rows go through mmap into the store's files: the blocks are reserved up front, so a full
    disk is ENOSPC from ``posix_fallocate`` (here injected) and not a SIGBUS mid-run; the store
    being created is removed again."""
    def full(*_: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio.os, "posix_fallocate", full)
    cfg, heads = _store_cfg(1000)
    with pytest.raises(AffeqError) as e:
        StoreWriter(tmp_path / "s", cfg, heads)
    assert SPACE_LINE.match(f"error: {e.value}"), str(e.value)
    assert "a/features.npy" in str(e.value)
    assert "need about 3.8 MB" in str(e.value)  # 1000 rows × 1000 float32 = 3.8 MiB
    assert not (tmp_path / "s").exists()


def test_write_enospc_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Any write through fsio (every file affeq-rt writes) turns ENOSPC into the one line and
    removes its temporary file; a staged report leaves none of its files either."""
    def json_on_full_disk() -> None:
        with fsio.atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_bytes(b"x" * 3000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def report_on_full_disk() -> None:
        with fsio.staged_files(tmp_path / "report") as d:
            (d / "table.md").write_text("complete")
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(AffeqError) as e:
        json_on_full_disk()
    assert SPACE_LINE.match(f"error: {e.value}"), str(e.value)
    assert "m.json" in str(e.value)
    with pytest.raises(AffeqError, match="no space left on device"):
        report_on_full_disk()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow  # ~50-100 s on 2 busy cores: every command, or three exports
def test_full_disk_commands(env, tiny_fs: Path, tmp_path: Path, capsys) -> None:
    """On a real full disk every writing command prints one line with the space needed, exits 1
    and leaves nothing where the user looks (before: SIGBUS, tracebacks, a partial report)."""
    store, maps = tmp_path / "store", tmp_path / "maps.safetensors"
    assert _run(capsys, *_extract(env, store, None, "--models", f"{A},{B}"))[0] == 0
    assert _run(capsys, "fit", "--models", f"{A},{B}", "--features", store, "--out", maps,
                "--method", "ols", "--quiet")[0] == 0
    _fill(tiny_fs, 48 << 10)  # 48 KB left: less than any output below
    cases = {
        "extract": _extract(env, tiny_fs / "s", None, "--models", f"{A},{B}"),
        "export": ["export", A, "--random-weights", "--export-root", tiny_fs / "ex", "--quiet"],
        "fit": ["fit", "--models", f"{A},{B}", "--features", store, "--out",
                tiny_fs / "m.safetensors", "--quiet"],
        "evaluate": ["evaluate", "--features", store, "--maps", maps, "--out", tiny_fs / "rep",
                     "--quiet", "--device", "cpu"],
        "build-hybrid": ["build-hybrid", "--src", A, "--dst", B, "--maps", maps, "--out",
                         tiny_fs / "h.onnx", "--random-weights", "--export-root", env["exports"],
                         "--quiet"],
    }
    for name, args in cases.items():
        code, err = _run(capsys, *args)
        line = _one_line(err)
        assert code == 1, (name, err)
        assert SPACE_LINE.match(line) or FULL_LINE.match(line), (name, line)
        left = [str(p.relative_to(tiny_fs)) for p in tiny_fs.rglob("*")
                if p.name != "filler" and not p.is_dir()]
        assert left == [], (name, left)
    assert not (tiny_fs / "rep").exists()  # no partial report folder either


# ---------------------------------------------------------------------------------------------
# 7. a failed run must not poison the next


def test_only_bad_images_then_the_same_rerun(env, tmp_path: Path, capsys) -> None:
    """Before: the rerun crashed (``start must be a multiple of batch_size``, exit 70)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.jpg").write_bytes(b"not an image")
    out = tmp_path / "s"
    for _ in range(2):
        code, err = _run(capsys, *_extract(env, out, bad))
        assert code == 1
        assert "none of the 3 images could be read" in _one_line(err)
        assert not out.exists()  # nothing to resume: no store left behind
    assert _run(capsys, *_extract(env, out))[0] == 0  # the corrected command, same --out
    assert FeatureStore.open(out).n == len(env["good"])


def test_bad_batch_size_is_never_recorded(env, tmp_path: Path, capsys) -> None:
    """Before: ``--batch-size 0`` was stored in the new store and the corrected command kept
    failing with it."""
    out = tmp_path / "s"
    code, err = _run(capsys, *_extract(env, out, None, "--batch-size", "0"))
    assert code == 1
    assert "batch size must be positive" in _one_line(err)
    assert not out.exists()
    assert _run(capsys, *_extract(env, out, None, "--batch-size", "4"))[0] == 0
    assert FeatureStore.open(out).manifest["batch_size"] == 4


def test_fit_refuses_before_any_work(env, tmp_path: Path, capsys) -> None:
    """One model: refused before exporting anything; one image: refused before the pass, no
    ``<out>.partial/`` (before: the whole pass ran, then the refusal left the checkpoint)."""
    fresh = tmp_path / "exports"
    code, err = _run(capsys, "fit", "--models", A, "--data", env["photos"], "--out",
                     tmp_path / "m.safetensors", "--random-weights", "--export-root", fresh)
    assert code == 1
    assert "at least two models" in _one_line(err)
    assert not fresh.exists() or not any(fresh.iterdir())
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(env["good"][0], one)
    out = tmp_path / "m2.safetensors"
    code, err = _run(capsys, "fit", "--models", f"{A},{B}", "--data", one, "--out", out,
                     "--random-weights", "--export-root", env["exports"], "--workers", "0",
                     "--method", "ols", "--quiet")
    assert code == 1
    assert "at least 2 training images" in _one_line(err)
    assert not out.exists()
    assert not Path(f"{out}.partial").exists()


# ---------------------------------------------------------------------------------------------
# 10. artefacts are verified on open


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_tampered_store_is_refused(env, tmp_path: Path, capsys) -> None:
    """Sizes and headers on every open; checksums with ``--verify`` and always in ``validate``
    (before: a modified store was read as if nothing had happened)."""
    store = tmp_path / "s"
    assert _run(capsys, *_extract(env, store, None, "--models", f"{A},{B}"))[0] == 0
    feats = store / A / "features.npy"
    _flip(feats, 0.7)  # a value changes; sizes and header still match
    FeatureStore.open(store)  # the cheap open cannot see a changed value ...
    for args in (["validate", "--features", store],
                 ["fit", "--models", f"{A},{B}", "--features", store, "--out",
                  tmp_path / "m.safetensors", "--verify", "--quiet"]):
        code, err = _run(capsys, *args)  # ... the full check does, in one line with the fix
        line = _one_line(err)
        assert code == 1
        assert f"{feats} fails its checksum" in line
        assert "extract again" in line
    with open(feats, "r+b") as f:  # truncated by a copy that ran out of space
        f.truncate(feats.stat().st_size - 4)
    with pytest.raises(AffeqError, match=r"features.npy has \d+ bytes, the manifest says"):
        FeatureStore.open(store)
    assert not (tmp_path / "m.safetensors").exists()


def test_verify_switches_recompute_the_checksums(env, hybrid_inputs, tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--verify`` on ``evaluate`` and ``$AFFEQ_RT_VERIFY=1`` for every reader recompute the
    store's checksums; without either, an open checks sizes and headers only."""
    store = tmp_path / "s"
    assert _run(capsys, *_extract(env, store, None, "--models", f"{A},{B}"))[0] == 0
    feats = store / B / "features.npy"
    _flip(feats, 0.6)
    sim = ["similarity", "--features", store, "--out", tmp_path / "sim", "--quiet"]
    assert _run(capsys, *sim)[0] == 0  # no switch: the changed value goes unseen
    checks = [(["evaluate", "--features", store, "--maps", hybrid_inputs["maps"],
                "--out", tmp_path / "report", "--verify"], {}),
              (sim, {"AFFEQ_RT_VERIFY": "1"}),
              (["fit", "--models", f"{A},{B}", "--features", store, "--out",
                tmp_path / "m.safetensors", "--quiet"], {"AFFEQ_RT_VERIFY": "yes"})]
    for args, environ in checks:
        with monkeypatch.context() as m:
            for k, v in environ.items():
                m.setenv(k, v)
            code, err = _run(capsys, *args)
        assert code == 1, (args[0], environ, err)
        assert f"{feats} fails its checksum" in _one_line(err)
    assert not (tmp_path / "m.safetensors").exists()
    assert not (tmp_path / "report").exists()


def _lie_in_header(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite a ``.npy`` header to claim ``shape``, padded to its old length: the file keeps
    its size and every data byte."""
    data = path.read_bytes()
    hlen = int.from_bytes(data[8:10], "little")
    old = data[10:10 + hlen].decode("latin1").rstrip()
    new = old.replace(str(eval(old)["shape"]), str(shape))  # noqa: S307 - a file we wrote
    path.write_bytes(data[:10] + new.ljust(hlen - 1).encode("latin1") + b"\n" + data[10 + hlen:])


def test_npy_headers_that_lie_with_the_right_size_are_refused(env, tmp_path: Path,
                                                              capsys) -> None:
    """A header claiming another shape of the same byte count (2n × d/2, or d × n) passes a size
    check; every open compares it with the manifest's n and feature width."""
    store = tmp_path / "s"
    assert _run(capsys, *_extract(env, store))[0] == 0
    st = FeatureStore.open(store)
    n, d = st.n, st.feature_dim(A)
    for shape in ((2 * n, d // 2), (d, n), (n * d,)):
        copy = tmp_path / f"lie{len(shape)}_{shape[0]}"
        shutil.copytree(store, copy)
        f = copy / A / "features.npy"
        _lie_in_header(f, shape)
        assert f.stat().st_size == (store / A / "features.npy").stat().st_size
        with pytest.raises(AffeqError, match=re.escape(
                f"{A}/features.npy holds float32 {list(shape)}, the manifest says float32 "
                f"{[n, d]}")):
            FeatureStore.open(copy)


@pytest.fixture(scope="module")
def hybrid_inputs(env, tmp_path_factory) -> dict[str, Path]:
    """A maps file A↔B fitted on the photos (shared by the hybrid tests)."""
    d = tmp_path_factory.mktemp("hybrid_inputs")
    assert main(["fit", "--models", f"{A},{B}", "--data", str(env["photos"]), "--out",
                 str(d / "maps.safetensors"), "--random-weights", "--export-root", env["exports"],
                 "--workers", "0", "--method", "ols", "--quiet"]) == 0
    return {"maps": d / "maps.safetensors"}


def _hybrid(env, maps: Path, out: Path, repo: Path | None = None) -> list[str]:
    return ["build-hybrid", "--src", A, "--dst", B, "--maps", maps, "--out", out,
            "--random-weights", "--export-root", env["exports"], "--quiet",
            *(["--server-repo", repo] if repo is not None else [])]


def test_bitflipped_hybrid_is_refused(env, hybrid_inputs, tmp_path: Path, capsys) -> None:
    """``inspect`` always and ``predict --verify`` recompute the hybrid's recorded hashes
    (before: a bit-flipped hybrid was inspected and served as if intact)."""
    out = tmp_path / "h.onnx"
    assert _run(capsys, *_hybrid(env, hybrid_inputs["maps"], out))[0] == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "integrity   verified" in capsys.readouterr().out
    _flip(out, 0.6)  # inside the weights: the file still parses
    for args in (["inspect", out], ["predict", out, env["good"][0], "--verify", "--quiet"]):
        code, err = _run(capsys, *args)
        line = _one_line(err)
        assert code == 1
        assert f"hybrid {out} fails its checksum" in line
        assert "rebuild" in line


def test_hybrid_external_data_checksum(env, hybrid_inputs, tmp_path: Path, capsys) -> None:
    """A hybrid whose weights live in an external ``.data`` file: its size is checked on every
    read, its SHA-256 by ``inspect`` and ``predict --verify``."""
    import onnx

    from affeq_rt.deploy.metadata import stamp_checksum

    built = tmp_path / "built.onnx"
    assert _run(capsys, *_hybrid(env, hybrid_inputs["maps"], built))[0] == 0
    out = tmp_path / "ext" / "h.onnx"
    out.parent.mkdir()
    onnx.save(onnx.load(str(built)), str(out), save_as_external_data=True,
              all_tensors_to_one_file=True, location="h.onnx.data", size_threshold=0)
    rec = stamp_checksum(out)
    data = out.parent / "h.onnx.data"
    assert rec["data_file"] == "h.onnx.data"
    assert rec["data_bytes"] == data.stat().st_size > 100_000
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "integrity   verified" in capsys.readouterr().out
    _flip(data, 0.5)  # a weight changes, the size does not
    assert main(["predict", str(out), str(env["good"][0]), "--quiet"]) == 0  # sizes only
    for args in (["inspect", out], ["predict", out, env["good"][0], "--verify", "--quiet"]):
        code, err = _run(capsys, *args)
        assert code == 1
        assert f"hybrid data file {data} fails its checksum" in _one_line(err)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 8)
    code, err = _run(capsys, "predict", out, env["good"][0], "--quiet")
    assert code == 1
    assert f"hybrid data file {data} has" in _one_line(err)


# ---------------------------------------------------------------------------------------------
# 12. one writer per output


HOLD = ("import sys, time; from affeq_rt.io.fsio import FolderLock; "
        "lock = FolderLock(sys.argv[1], 'feature store').acquire(); print('locked', flush=True); "
        "time.sleep(600)")


def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(env, tmp_path: Path,
                                                                   capsys) -> None:
    """Two runs on one store: the second says who holds it; once the holder is killed (-9) the
    kernel has dropped its flock and the same command runs (before: both wrote the store)."""
    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "--pretend-extract"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _run(capsys, *_extract(env, out))
        line = _one_line(err)
        assert code == 1
        assert "is being written by another affeq-rt run" in line
        assert f"pid {holder.pid} on " in line
        assert "--pretend-extract" in line
        assert "started 20" in line
        assert "wait for it to finish" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _run(capsys, *_extract(env, out))[0] == 0
    assert FeatureStore.open(out).n == len(env["good"])


def test_row_writers_of_the_same_run_skip_the_lock(tmp_path: Path) -> None:
    """Workers writing rows for the driver open the store with ``lock=False``."""
    cfg, heads = _store_cfg(8)
    driver = StoreWriter(tmp_path / "s", cfg, heads)
    with pytest.raises(AffeqError, match="being written by another affeq-rt run"):
        StoreWriter(tmp_path / "s", cfg, heads)
    worker = StoreWriter(tmp_path / "s", cfg, heads, lock=False)
    worker.write("a", 4, np.ones((4, 1000), np.float32))
    worker.close()
    driver.close()
    with fsio.FolderLock(tmp_path / "s"):  # released: anyone may take it now
        pass


# ---------------------------------------------------------------------------------------------
# 14. leftovers and file modes


@pytest.mark.slow  # two real exports in subprocesses (~45 s on 2 busy cores)
@pytest.mark.usefixtures("env")
def test_killed_export_leaves_nothing_after_the_next_run(tmp_path: Path) -> None:
    """kill -9 mid-export leaves its temporary folder; the next export into the same root
    removes it (before: hidden ``.NAME.*.tmp`` folders piled up, up to 23 MB each)."""
    root = tmp_path / "exports"
    cmd = [sys.executable, "-m", "affeq_rt.cli.main", "export", A, "--random-weights",
           "--export-root", str(root), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120 and proc.poll() is None:
        if root.is_dir() and _hidden(root):  # the temporary export folder exists: kill now
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "export finished before it could be killed"
    assert _hidden(root), "the kill left no temporary folder to clean"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert _hidden(root) == []
    assert (root / A / "manifest.json").is_file()


def test_kill_between_hybrid_and_repository(env, hybrid_inputs, tmp_path: Path, capsys,
                                            monkeypatch) -> None:
    """A run stopped after the hybrid and before its Triton repository: the same command (no
    ``--force``) completes the repository from the verified hybrid (before: it refused)."""
    import affeq_rt.deploy.hybrid as hybrid

    out, repo = tmp_path / "h.onnx", tmp_path / "repo"
    real = hybrid.write_model_repository

    def killed(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # the moment a kill would strike

    monkeypatch.setattr(hybrid, "write_model_repository", killed)
    assert _run(capsys, *_hybrid(env, hybrid_inputs["maps"], out, repo))[0] == 130
    assert out.is_file()
    assert not (repo / f"{A}_to_{B}").exists()
    monkeypatch.setattr(hybrid, "write_model_repository", real)
    code, err = _run(capsys, *_hybrid(env, hybrid_inputs["maps"], out, repo))
    assert code == 0, err
    assert (repo / f"{A}_to_{B}" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert (repo / f"{A}_to_{B}" / "config.pbtxt").is_file()
    code, err = _run(capsys, *_hybrid(env, hybrid_inputs["maps"], out, repo))
    assert code == 1
    assert "already exists" in _one_line(err)


@pytest.mark.slow  # ~50-100 s on 2 busy cores: every command, or three exports
def test_every_output_has_the_umask_mode(env, tmp_path: Path, capsys) -> None:
    """One mode for every output: 0666/0777 minus the umask (before: ``.safetensors`` 0600)."""
    old = os.umask(0o022)
    try:
        store, maps = tmp_path / "s", tmp_path / "m.safetensors"
        assert _run(capsys, *_extract(env, store, None, "--models", f"{A},{B}"))[0] == 0
        assert _run(capsys, "fit", "--models", f"{A},{B}", "--features", store, "--out", maps,
                    "--quiet")[0] == 0
        assert _run(capsys, "export", A, "--random-weights", "--export-root",
                    tmp_path / "ex", "--quiet")[0] == 0
        for p in [maps, *store.rglob("*"), *(tmp_path / "ex").rglob("*")]:
            want = 0o755 if p.is_dir() else 0o644
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    finally:
        os.umask(old)


def test_a_store_with_nothing_committed_binds_no_setting(env, tmp_path: Path, capsys) -> None:
    """Before: a first run that failed before its first commit (here: random-weight features
    too small for float16) left a store whose dtype the corrected command could not change
    ("already holds a different feature store (dtype differ)")."""
    out = tmp_path / "s"
    code, err = _run(capsys, *_extract(env, out, None, "--dtype", "float16"))
    assert code == 1
    assert "too small for float16" in _one_line(err)
    assert _run(capsys, *_extract(env, out, None, "--dtype", "float32"))[0] == 0
    st = FeatureStore.open(out)
    assert (st.n, st.manifest["dtype"]) == (len(env["good"]), "float32")
