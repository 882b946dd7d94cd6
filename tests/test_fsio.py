"""Atomic writes leave either the old file or the new one, never a half-written file."""

from __future__ import annotations

import os

import pytest

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import (
    atomic_path,
    check_path,
    ensure_writable_dir,
    output_lock,
    read_json,
    write_json_atomic,
)


def test_atomic_write_replaces_and_cleans_up(tmp_path) -> None:
    dest = tmp_path / "m.json"
    write_json_atomic(dest, {"a": 1})
    assert read_json(dest) == {"a": 1}

    def crash_mid_write() -> None:
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        crash_mid_write()
    assert read_json(dest) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_corrupt_and_missing_json(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(AffeqError, match="corrupt"):
        read_json(tmp_path / "bad.json", "manifest")
    with pytest.raises(AffeqError, match="does not exist"):
        read_json(tmp_path / "none.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(AffeqError, match="not writable"):
        ensure_writable_dir(ro)


def test_folder_under_a_file_is_reported(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AffeqError, match="cannot create output folder"):
        ensure_writable_dir(tmp_path / "file" / "sub")


def test_written_files_get_umask_mode_not_0600(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path) -> None:
    """A killed run's ``.affeq-tmp.*`` leftovers go with the next write into the same folder;
    a live run's, another host's and unrelated hidden files stay."""
    import subprocess
    import sys

    from affeq_rt.io.fsio import TMP_PREFIX, _host, clean_stale, write_bytes_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)  # exited: no such process now (a reused pid would only keep a file)
    stale = tmp_path / f"{TMP_PREFIX}{_host()}.{pid}.abcd.export.tmp"
    stale.mkdir()
    (stale / "features.onnx").write_bytes(b"x" * 100)
    live = tmp_path / f"{TMP_PREFIX}{_host()}.{os.getpid()}.abcd.other.tmp"
    foreign = tmp_path / f"{TMP_PREFIX}otherhost.{pid}.abcd.x.tmp"
    mine = tmp_path / ".keep"
    for p in (live, foreign, mine):
        p.write_text("x")
    write_bytes_atomic(tmp_path / "out.txt", b"new")
    assert not stale.exists()
    assert live.exists()
    assert foreign.exists()
    assert mine.exists()
    assert clean_stale(tmp_path) == []


# ------------------------------------------------------------ one writer per output (issue 23)

HOLD = """
import sys, time
from affeq_rt.io.fsio import output_lock
lock = output_lock(sys.argv[1], "maps file").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_output_lock_refuses_a_second_writer_and_leaves_no_file(tmp_path) -> None:
    """Two runs writing one file: the second is refused naming the first (before, both
    exited 0 and one result was lost); a holder killed with SIGKILL loses the lock to the next
    run; a released lock leaves nothing beside the output."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "maps.safetensors"
    first = output_lock(out, "maps file").acquire()
    with pytest.raises(AffeqError, match=r"maps file .*maps.safetensors is being written by "
                                         r"another affeq-rt run \(pid \d+"):
        output_lock(out, "maps file").acquire()
    output_lock(tmp_path / "other.safetensors").acquire().release()  # other outputs: free
    first.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AffeqError, match=f"pid {holder.pid} "):
            output_lock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(out):  # the dead holder's lock file is taken over, then removed
        assert (tmp_path / f".{out.name}.affeq-rt.lock").is_file()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["a" * 300, "d/" + "b" * 256 + "/x.onnx"])
def test_a_path_too_long_is_one_line(tmp_path, name: str) -> None:
    too_long = "longer than the file system allows.*at most 255"
    with pytest.raises(AffeqError, match=too_long) as e, atomic_path(tmp_path / name):
        pass
    assert "\n" not in str(e.value)
    assert len(str(e.value)) < 300
    with pytest.raises(AffeqError, match="choose a shorter"):
        check_path(tmp_path / ("c/" * 2100))
    assert not any(tmp_path.iterdir())
