"""Atomic file writing, checksums and manifests: every file affeq-rt writes goes through here.

Also the storage safety net every writer shares (issue 10): temporary files and folders are named
``.affeq-tmp.<host>.<pid>.…`` and removed by the next write into the same folder once their owner
process is gone; a full disk (ENOSPC/EDQUOT) becomes one ``AffeqError`` line saying how much
space is needed (:func:`space_error`), checked up front where the size is known
(:func:`check_free_space`) and reserved for real where files are preallocated
(:func:`preallocate`); every file gets the mode a plain ``open`` would give it (0666 & ~umask);
:class:`FolderLock` and :func:`output_lock` keep two runs from writing one output;
:func:`check_path` refuses a path too long for the file system before any ``os`` call trips.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from affeq_rt.errors import AffeqError

VERIFY_ENV = "AFFEQ_RT_VERIFY"  # "1": readers recompute full checksums (as --verify does)
TMP_PREFIX = ".affeq-tmp."
LOCK_FILE = ".affeq-rt.lock"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
MB = 1 << 20


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_requested(verify: bool | None) -> bool:
    """Whether a reader recomputes full checksums: asked by the caller (``--verify``) or by
    ``$AFFEQ_RT_VERIFY`` for every reading command. The variable wins over a caller's False
    (a command's ``--verify`` flag defaults to False: it turned the variable off)."""
    return bool(verify) or os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true",
                                                                                "yes", "on")


def check_path(path: str | os.PathLike, what: str = "output path") -> Path:
    """AffeqError when ``path`` (or a name in it) is longer than the file system allows: the
    ``os`` calls would fail with ENAMETOOLONG, and ``Path.exists`` raises it (a traceback)."""
    p = Path(path)
    raw = os.fsencode(p)
    try:
        name_max = os.pathconf(_existing(p.parent), "PC_NAME_MAX")
        path_max = os.pathconf(_existing(p.parent), "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    text = str(p) if len(str(p)) <= 120 else f"{str(p)[:60]}…{str(p)[-40:]}"
    long = [n for n in raw.split(b"/") if len(n) > name_max]
    if long:
        raise AffeqError(f"{what} {text} is longer than the file system allows (a name of "
                         f"{len(long[0])} bytes; at most {name_max})", "choose a shorter name")
    if len(os.fsencode(os.path.abspath(p))) >= path_max:
        raise AffeqError(f"{what} {text} is longer than the file system allows ({len(raw)} "
                         f"bytes; at most {path_max - 1})", "choose a shorter path")
    return p


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check we can write there, or raise AffeqError."""
    p = check_path(path, "output folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AffeqError(f"cannot create output folder {p}: {e.strerror}",
                         "choose a writable --out folder") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise AffeqError(f"output folder {p} is not writable", "choose a writable --out folder")
    return p


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def umask_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (mkstemp/mkdtemp and some writers
    make 0600/0700), so a server running as another user can read what we wrote."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def umask_tree(path: str | os.PathLike) -> None:
    """:func:`umask_mode` on ``path`` and everything under it (links left alone)."""
    p = Path(path)
    umask_mode(p)
    if p.is_dir():
        for q in p.rglob("*"):
            if not q.is_symlink():
                umask_mode(q)


# ---------------------------------------------------------------------------------------------
# disk space


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on ``folder``'s file system."""
    st = os.statvfs(folder)
    return int(st.f_bavail) * int(st.f_frsize)


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (statvfs needs one)."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):  # a name too long: look further up
            if p.exists():
                return p
    return Path("/")


def _mb(n: int) -> str:
    return f"{max(n, 0) / MB:.1f}" if n < 10 * MB else f"{n // MB}"


# staging folder -> (the folder its files are for, bytes the whole set needs): messages name the
# file where the user will look for it, not its hidden staging copy
_STAGED: dict[Path, tuple[Path, int | None]] = {}


def space_error(path: str | os.PathLike, need: int | None = None,
                at_least: int | None = None) -> AffeqError:
    """The one line for a full disk: which file, about how much space is needed, how much is free.

    ``need`` is the size of what was being written; when unknown, ``at_least`` is what had been
    written when the disk filled (a lower bound, said as such)."""
    p = Path(path)
    if p.parent in _STAGED:
        final, total = _STAGED[p.parent]
        p, need = final / p.name, total or need
    have = free_bytes(_existing(p.parent if not p.exists() else p))
    if need:
        need_txt = f"need about {_mb(need)} MB free"
    elif at_least:
        need_txt = f"need more than {_mb(at_least)} MB free"
    else:
        need_txt = "need more space"
    return AffeqError(f"no space left on device writing {p}; {need_txt}, have {_mb(have)} MB",
                      "free some space or write to another folder, then rerun the same command")


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library wrapped it in another exception's text."""
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    text = str(e)
    return any(os.strerror(n) in text for n in _FULL_ERRNOS)


def check_free_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """AffeqError before any work when ``folder`` has less than ``need`` bytes free for ``what``.

    A 1 MB (or 2 %) margin is added for file-system metadata and the small files beside it."""
    target = Path(folder)
    need = int(need + max(MB, need // 50))
    have = free_bytes(_existing(target))
    if have < need:
        raise AffeqError(f"not enough space for {what} in {target}: need about {_mb(need)} MB "
                         f"free, have {_mb(have)} MB",
                         "free some space or write to another folder")


def preallocate(f: Any, size: int, path: str | os.PathLike) -> None:
    """Reserve ``size`` bytes of the open file ``f`` for real (``posix_fallocate``), so a full
    disk is an error now and not a SIGBUS when rows are later written through a memory map."""
    try:
        os.posix_fallocate(f.fileno(), 0, int(size))
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise space_error(path, size) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


# ---------------------------------------------------------------------------------------------
# temporary names, stale leftovers


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:40] or "h"


def tmp_name(dest: Path, suffix: str = ".tmp") -> Path:
    """``.affeq-tmp.<host>.<pid>.<random>.<name><suffix>`` beside ``dest``: recognisable, with
    its owner, so :func:`clean_stale` can tell leftovers of dead runs from live work."""
    return dest.parent / f"{TMP_PREFIX}{_host()}.{os.getpid()}.{secrets.token_hex(4)}." \
                         f"{dest.name[:120]}{suffix}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.affeq-tmp.*`` leftovers in ``folder`` whose owner (this host) has died; returns
    them. Leftovers of live runs, of other hosts and unrecognised names are kept."""
    removed: list[Path] = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(TMP_PREFIX):
            continue
        parts = e.name[len(TMP_PREFIX):].split(".")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if pid_alive(int(parts[1])):
            continue
        p = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else 0


def _space_or_raise(e: BaseException, dest: Path, written: Path, need: int | None) -> None:
    """Re-raise a full disk as the one-line :func:`space_error` (others propagate unchanged)."""
    if isinstance(e, AffeqError) or not is_disk_full(e):
        return
    at_least = None
    with contextlib.suppress(OSError):
        at_least = _size(written) or None
    raise space_error(dest, need, at_least) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced, given the umask mode
    and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched; a full disk
    becomes :func:`space_error`. ``need`` (bytes, when known) is checked before the caller works.
    """
    dest = check_path(path)
    ensure_writable_dir(dest.parent)
    clean_stale(dest.parent)
    if need:
        check_free_space(dest.parent, need, str(dest))
    tmp_path = tmp_name(dest)
    try:
        tmp_path.touch()
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        umask_mode(tmp_path)
        os.replace(tmp_path, dest)
    except BaseException as e:
        try:
            _space_or_raise(e, dest, tmp_path, need)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    On any exception the temporary folder is removed and ``path`` is left untouched (a full
    disk becomes :func:`space_error`). An existing ``path`` is moved aside first and deleted only
    after the new one is in place. Every file in it gets the umask mode.
    """
    dest = check_path(path)
    ensure_writable_dir(dest.parent)
    clean_stale(dest.parent)
    if need:
        check_free_space(dest.parent, need, str(dest))
    tmp = tmp_name(dest)
    tmp.mkdir()
    old: Path | None = None
    try:
        yield tmp
        umask_tree(tmp)
        if dest.exists():
            old = tmp_name(dest, ".old")
            old.mkdir()
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            _space_or_raise(e, dest, tmp, need)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not dest.exists():  # put the previous folder back
                os.replace(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success each file in it is moved into
    ``folder`` (created if needed; other files there are kept), so a failure (a full disk
    included) leaves no partial set of new files where the user looks. ``need`` (bytes, an
    estimate of the whole set) is checked before the caller writes anything."""
    dest = check_path(folder)
    ensure_writable_dir(dest.parent)
    clean_stale(dest.parent)
    if need:
        check_free_space(dest.parent, need, f"{dest}")
    stage = tmp_name(dest, ".stage")
    stage.mkdir()
    _STAGED[stage] = (dest, need)
    try:
        yield stage
        ensure_writable_dir(dest)
        for f in sorted(stage.iterdir()):
            umask_mode(f)
            os.replace(f, dest / f.name)
    except BaseException as e:
        _space_or_raise(e, dest, stage, need)
        raise
    finally:
        _STAGED.pop(stage, None)
        shutil.rmtree(stage, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def jsonable(o: Any) -> Any:
    """``json.dumps(default=...)`` hook: NumPy scalars and arrays as Python values, else ``str``."""
    item = getattr(o, "item", None)
    if callable(item) and getattr(o, "ndim", None) == 0:
        return item()
    tolist = getattr(o, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(o)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n"
    write_bytes_atomic(path, text.encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into an AffeqError naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise AffeqError(f"{what} {p} does not exist", "check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AffeqError(f"{what} {p} is corrupt ({e})", "regenerate it") from None


# ---------------------------------------------------------------------------------------------
# one writer per output


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.affeq-rt.lock`` naming its holder.

    The holder (pid, host, command, start time) is written into the lock file so a refused run
    can say who writes the folder. The kernel drops the lock when the holding process ends (even
    by kill -9), so a lock whose holder died is taken over without any clean-up step.

    ``lock_file`` puts the lock elsewhere (:func:`output_lock`: beside one output file);
    ``remove`` deletes it on release, race-free: the lock is taken only on a file that is still
    the one at ``lock_file`` after the ``flock`` (a run that finds it unlinked meanwhile retries),
    and it is unlinked while still held.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder", *,
                 lock_file: str | os.PathLike | None = None, remove: bool = False) -> None:
        self.folder = Path(folder)
        self.what = what
        self._path = Path(lock_file) if lock_file is not None else self.folder / LOCK_FILE
        self.remove = remove
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self._path

    def acquire(self) -> FolderLock:
        """Take the lock or raise AffeqError naming the run that holds it."""
        if self._fd is not None:
            return self
        ensure_writable_dir(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise AffeqError(f"{self.what} {self.folder} is being written by another "
                                 f"affeq-rt run ({holder})",
                                 "wait for it to finish or stop it, then rerun; never write one "
                                 "output from two runs at once") from None
            if not self.remove or _same_file(fd, self.path):
                break
            os.close(fd)  # the holder we waited on removed it: lock the new one
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(sys.argv)[:500],
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict) or not info:
            return "holder unknown"
        return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
                f"{info.get('command')}")

    def release(self) -> None:
        """Drop the lock (the folder lock's file stays: deleting it would race with a waiting
        run; an :func:`output_lock`'s file is unlinked while still held, which does not)."""
        if self._fd is not None:
            if self.remove and _same_file(self._fd, self.path):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether open file ``fd`` is still the file at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def output_lock(path: str | os.PathLike, what: str = "output") -> FolderLock:
    """The writer lock of one output file (or folder) ``path``, not yet taken: an exclusive
    ``flock`` on ``.<name>.affeq-rt.lock`` beside it, naming its holder, removed on release.

    Hold it for the whole run that writes ``path`` (its checkpoints included), so a second run
    writing the same output is refused at once instead of both exiting 0 with one result lost::

        with output_lock(out, "maps file"):
            ...  # checkpoint, solve, save_maps(out, ...)
    """
    dest = Path(path)
    check_path(dest)
    lock_file = dest.parent / f".{dest.name[:200]}{LOCK_FILE}"
    return FolderLock(dest, what, lock_file=lock_file, remove=True)


def versions() -> dict[str, str]:
    """Versions of the packages that shape results, for manifests."""
    out: dict[str, str] = {}
    from importlib import metadata

    for pkg in ("affeq-rt", "numpy", "onnx", "onnxruntime-gpu", "onnxruntime", "torch", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out
