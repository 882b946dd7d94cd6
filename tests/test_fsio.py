"""Atomic writes leave either the old file or the new one, never a half-written file."""

from __future__ import annotations

import os

import pytest

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path, ensure_writable_dir, read_json, write_json_atomic


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
