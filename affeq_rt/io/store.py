"""The feature store: per-model (n × d) arrays on disk, resumable while written, mmap'd when read.

Layout (see ARCHITECTURE.md): ``manifest.json``, ``images.txt``, ``labels.npy``,
``<model>/features.npy``, ``<model>/head.safetensors``; while being written also ``progress.json``
(the committed sample index). Rows are written in sample order into preallocated ``.npy`` files;
progress is committed (atomically) only after the rows are flushed, so a run killed at any
point resumes from the last commit and produces the same bytes as an uninterrupted run.

Storage safety (issue 10): a writer holds ``.affeq-rt.lock`` in the store (one run per store;
``lock=False`` for row writers in other processes of the same run); the arrays are preallocated
for real (``posix_fallocate``) after a free-space check, so a full disk is a one-line error, not a
SIGBUS; a bad setting never enters the resumable state. Opening checks sizes and headers against
the manifest; ``verify=True`` (or ``AFFEQ_RT_VERIFY=1``) also recomputes every checksum.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.fsio import (
    LOCK_FILE,
    FolderLock,
    atomic_path,
    check_free_space,
    ensure_writable_dir,
    preallocate,
    read_json,
    sha256_file,
    verify_requested,
    versions,
    write_bytes_atomic,
    write_json_atomic,
)
from affeq_rt.io.heads import Head, save_head

FORMAT = 1
DTYPES = ("float16", "float32")
REEXTRACT = "delete the store and run affeq-rt extract again"


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` header; AffeqError if it is not one."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = read(f)
            return tuple(int(s) for s in shape), np.dtype(dtype), f.tell()
    except FileNotFoundError:
        raise AffeqError(f"feature store file {path} is missing", REEXTRACT) from None
    except (ValueError, OSError) as e:
        raise AffeqError(f"feature store file {path} has a corrupt header ({e})",
                         REEXTRACT) from None


def _is_safe_name(model: object) -> bool:
    """Whether ``model`` can name a folder inside the store (and only inside it)."""
    return (isinstance(model, str) and bool(model) and not model.startswith(".")
            and not any(c in model for c in "/\\\0"))


def _safe_name(model: str) -> str:
    if not _is_safe_name(model):
        raise AffeqError(f"model name {model!r} cannot be a store folder", "use a registry name")
    return model


def _is_inside(rel: object) -> bool:
    """Whether manifest path ``rel`` names a file inside the store: relative, no ``..``."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


#: ``images.txt`` encodings: "lines" (before issue 23: a path per line, split by
#: ``str.splitlines``) and "escaped" (a path's bytes per ``\n``-ended line, with ``\\``, ``\n``
#: and ``\r`` escaped: any file name, newlines, U+2028 and non-UTF-8 bytes included).
IMAGES_ENCODING = "escaped"
_UNESCAPE = {b"\\\\": b"\\", b"\\n": b"\n", b"\\r": b"\r"}


def encode_image_paths(paths: Sequence[str]) -> bytes:
    """``images.txt`` bytes for ``paths`` (one escaped line each; see :data:`IMAGES_ENCODING`)."""
    out = []
    for p in paths:
        b = os.fsencode(p).replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        out.append(b + b"\n")
    return b"".join(out)


def decode_image_paths(data: bytes) -> list[str]:
    """The paths :func:`encode_image_paths` wrote (inverse, exactly)."""
    import re

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [os.fsdecode(re.sub(rb"\\[\\nr]", lambda m: _UNESCAPE[m.group(0)], ln))
            for ln in lines]


def _manifest_problem(man: Any) -> str | None:
    """What is wrong with a complete store's manifest (None: usable). Checked on every open, so
    an edited manifest is one error line, and no name in it reaches outside the store."""
    models = man.get("models")
    if not isinstance(models, list) or not models:
        return "'models' is not a list of network names"
    bad = [m for m in models if not _is_safe_name(m)]
    if bad:
        return f"network name {bad[0]!r} is not a folder of the store"
    if len(set(models)) != len(models):
        return "'models' names a network twice"
    n = man.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return f"'n' is {n!r}, not a row count"
    if man.get("dtype") not in DTYPES:
        return f"'dtype' is {man.get('dtype')!r}, not one of {', '.join(DTYPES)}"
    dims, specs = man.get("feature_dims"), man.get("specs")
    if not isinstance(dims, dict) or not isinstance(specs, dict):
        return "'feature_dims' or 'specs' is not an object"
    for m in models:
        d = dims.get(m)
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            return f"'feature_dims' of {m} is {d!r}"
        spec = specs.get(m)
        if not isinstance(spec, dict):
            return f"'specs' has no object for {m}"
        off = spec.get("label_offset", 0)
        if off is not None and (not isinstance(off, int) or isinstance(off, bool) or off < 0):
            return f"the label_offset of {m} is {off!r}"
    for key in ("checksums", "sizes"):
        table = man.get(key, {})
        if not isinstance(table, dict):
            return f"'{key}' is not an object"
        outside = [rel for rel in table if not _is_inside(rel)]
        if outside:
            return f"'{key}' names {outside[0]!r}, a path outside the store"
    if not all(isinstance(v, str) for v in man.get("checksums", {}).values()):
        return "'checksums' holds a value that is not a hex digest"
    if not all(isinstance(v, int) and not isinstance(v, bool)
               for v in man.get("sizes", {}).values()):
        return "'sizes' holds a value that is not a byte count"
    if man.get("images_encoding", "lines") not in ("lines", IMAGES_ENCODING):
        return f"'images_encoding' is {man.get('images_encoding')!r}"
    return None


F16_MAX = 65504.0
F16_TINY = 2.0 ** -14  # smallest normal float16: below it values lose precision or become 0


def _check_float16(model: str, feats: np.ndarray) -> None:
    """Refuse features that float16 cannot hold: any overflow, or >1% of non-zeros subnormal."""
    a = np.abs(feats)
    if not np.isfinite(feats).all():
        return  # NaN/Inf rows are the accumulator's business (skipped and counted there)
    if (a > F16_MAX).any():
        raise AffeqError(f"{model} produced features up to {a.max():.3g}, beyond float16's range",
                         "use --dtype float32")
    nz = a[a > 0]
    if nz.size and (nz < F16_TINY).mean() > 0.01:
        raise AffeqError(f"{model}'s features are too small for float16 (median |x| = "
                         f"{np.median(nz):.3g}; they would round to 0)", "use --dtype float32")


def _label_offset(spec: Mapping[str, Any]) -> int:
    """Leading background classes of a head (registry ``label_offset``; TF-slim: 1)."""
    return int(spec.get("label_offset", 0) or 0)


# ---------------------------------------------------------------------------------------------
# reading


class StoreLike(Protocol):
    """What readers of features need: :class:`FeatureStore` on disk or :class:`ArrayStore`."""

    @property
    def models(self) -> list[str]: ...
    @property
    def n(self) -> int: ...
    @property
    def labels(self) -> np.ndarray | None: ...
    def features(self, model: str) -> np.ndarray: ...
    def head(self, model: str) -> Head: ...
    def spec(self, model: str) -> dict[str, Any]: ...


@dataclass
class ArrayStore:
    """An in-memory :class:`FeatureStore`: the same reading protocol over arrays.

    ``features_[m]`` is ``[n, d_m]``; ``heads_[m]`` is ``(W [K, d_m], b [K])`` as in a head file
    (background rows included; ``head(m)`` strips the spec's ``label_offset`` like the store);
    ``labels_`` is int64 ``[n]`` with −1 for unknown (or None); ``specs_[m]`` a spec dict.
    """

    features_: dict[str, np.ndarray]
    heads_: dict[str, tuple[np.ndarray, np.ndarray]]
    labels_: np.ndarray | None = None
    specs_: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Model names, in insertion order."""
        return list(self.features_)

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(next(iter(self.features_.values())).shape[0]) if self.features_ else 0

    @property
    def labels(self) -> np.ndarray | None:
        """int64 [n] labels, or None when every label is unknown (-1)."""
        if self.labels_ is None:
            return None
        lab = np.asarray(self.labels_, dtype=np.int64)
        return None if bool((lab < 0).all()) else lab

    def _check(self, model: str) -> str:
        if model not in self.features_:
            raise AffeqError(f"model {model!r} is not in the in-memory feature store (it has "
                             f"{', '.join(self.models)})", "pass features for it")
        return model

    def features(self, model: str) -> np.ndarray:
        """The [n, d] features of ``model``."""
        return self.features_[self._check(model)]

    def head(self, model: str) -> Head:
        """The classifier, background rows stripped (as :meth:`FeatureStore.head`)."""
        w, b = self.heads_[self._check(model)]
        return Head.from_raw(np.asarray(w), np.asarray(b), _label_offset(self.spec(model)))

    def spec(self, model: str) -> dict[str, Any]:
        """The spec dict (a bare one naming the model when none was given)."""
        return self.specs_.get(model, {"name": model, "label_offset": 0})


class FeatureStore:
    """A complete feature store opened for reading (features are memory-mapped, read-only)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._labels: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool | None = None) -> FeatureStore:
        """Open a store; AffeqError if it is missing, unfinished, not a store, or its files do not
        match the manifest (sizes, ``.npy`` headers: always; SHA-256: with ``verify``, default
        ``$AFFEQ_RT_VERIFY``)."""
        p = Path(path)
        if not p.is_dir():
            raise AffeqError(f"feature store {p} does not exist", "run affeq-rt extract first")
        mf = p / "manifest.json"
        if not mf.is_file():
            raise AffeqError(f"{p} is not a feature store (no manifest.json)",
                             "pass a folder written by affeq-rt extract")
        man = read_json(mf, "store manifest")
        if not isinstance(man, dict) or man.get("format") != FORMAT or "models" not in man:
            raise AffeqError(f"{p} has an unknown store format", "re-run affeq-rt extract")
        if not man.get("complete"):
            raise AffeqError(f"feature store {p} is unfinished", "rerun the same affeq-rt "
                             "extract command to finish it")
        problem = _manifest_problem(man)
        if problem is not None:
            raise AffeqError(f"feature store {p} has an edited or corrupt manifest.json "
                             f"({problem})", REEXTRACT)
        store = cls(p, man)
        store.check()
        if verify_requested(verify):
            store.verify()
        return store

    @property
    def models(self) -> list[str]:
        """Model names, in extraction order."""
        return list(self.manifest["models"])

    @property
    def n(self) -> int:
        """Number of feature rows (readable images)."""
        return int(self.manifest["n"])

    @property
    def dtype(self) -> str:
        """Feature dtype on disk (float16 or float32)."""
        return str(self.manifest["dtype"])

    @property
    def images(self) -> list[str]:
        """Image paths, one per row (any file name: see :data:`IMAGES_ENCODING`)."""
        f = self.path / "images.txt"
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            raise AffeqError(f"feature store file {f} is missing", REEXTRACT) from None
        if self.manifest.get("images_encoding") == IMAGES_ENCODING:
            paths = decode_image_paths(data)
        else:  # stores written before the escaped encoding
            paths = data.decode("utf-8", "surrogateescape").splitlines()
        if len(paths) != self.n:
            raise AffeqError(f"feature store file {f} lists {len(paths)} images, the manifest "
                             f"says {self.n}", REEXTRACT)
        return paths

    @property
    def labels(self) -> np.ndarray | None:
        """int64 [n] class labels, or None when every label is unknown (-1)."""
        if self._labels is None:
            self._labels = np.load(self.path / "labels.npy")
        return None if (self._labels < 0).all() else self._labels

    def _check(self, model: str) -> str:
        if model not in self.manifest["models"]:
            raise AffeqError(f"model {model!r} is not in feature store {self.path} "
                             f"(it has {', '.join(self.models)})",
                             "extract it with affeq-rt extract --models …")
        return model

    def features(self, model: str) -> np.ndarray:
        """Memory-mapped [n, d] features of ``model`` (read-only)."""
        arr = np.load(self.path / self._check(model) / "features.npy", mmap_mode="r")
        if arr.shape[0] != self.n:
            raise AffeqError(f"{self.path}/{model}/features.npy has {arr.shape[0]} rows, the "
                             f"manifest says {self.n}", "re-run affeq-rt extract into a new folder")
        return arr

    def head(self, model: str) -> Head:
        """The model's classifier as copied into the store, background rows (the spec's
        ``label_offset``) stripped: logit ``c`` is class ``c``, as the labels are."""
        return Head.load(self.path / self._check(model) / "head.safetensors",
                         _label_offset(self.spec(model)))

    def spec(self, model: str) -> dict[str, Any]:
        """The registry spec (dict) the features were extracted with."""
        return dict(self.manifest["specs"][self._check(model)])

    def feature_dim(self, model: str) -> int:
        """Feature width of ``model``."""
        return int(self.manifest["feature_dims"][self._check(model)])

    def check(self) -> None:
        """The cheap checks every open does: each listed file exists with its recorded size,
        ``features.npy`` headers say [n, d] in the store's dtype and the file holds exactly those
        bytes, ``labels.npy`` holds n labels. AffeqError naming the first bad file."""
        man = self.manifest
        sizes = man.get("sizes") or {}
        for rel in man.get("checksums") or {}:
            f = self.path / rel
            if not f.is_file():
                raise AffeqError(f"feature store file {f} is missing", REEXTRACT)
            if rel in sizes and f.stat().st_size != int(sizes[rel]):
                raise AffeqError(f"feature store file {f} has {f.stat().st_size} bytes, the "
                                 f"manifest says {sizes[rel]} (truncated or modified)", REEXTRACT)
        dims = man.get("feature_dims") or {}
        for m in self.models:
            f = self.path / m / "features.npy"
            shape, dtype, offset = npy_layout(f)
            want = (self.n, int(dims.get(m, shape[-1] if shape else -1)))
            if shape != want or dtype != np.dtype(self.dtype):
                raise AffeqError(f"feature store file {f} holds {dtype} {list(shape)}, the "
                                 f"manifest says {self.dtype} {list(want)}", REEXTRACT)
            size = offset + self.n * want[1] * dtype.itemsize
            if f.stat().st_size != size:
                raise AffeqError(f"feature store file {f} has {f.stat().st_size} bytes, its "
                                 f"header needs {size} (truncated or modified)", REEXTRACT)
        lab = self.path / "labels.npy"
        if lab.exists():
            shape, _, _ = npy_layout(lab)
            if shape != (self.n,):
                raise AffeqError(f"feature store file {lab} holds {list(shape)} labels, the "
                                 f"manifest says {self.n}", REEXTRACT)

    def verify(self) -> None:
        """Cheap checks, then recompute every checksum in the manifest; AffeqError naming the
        first file that differs."""
        self.check()
        for rel, digest in self.manifest.get("checksums", {}).items():
            if sha256_file(self.path / rel) != digest:
                raise AffeqError(f"feature store file {self.path / rel} fails its checksum "
                                 "(corrupt or modified)", REEXTRACT)


# ---------------------------------------------------------------------------------------------
# writing


def open_store(store: StoreLike | str | os.PathLike, verify: bool | None = None) -> StoreLike:
    """The store object as given, or ``FeatureStore.open`` of a folder path (``verify``: also
    recompute its checksums; None: ``$AFFEQ_RT_VERIFY``)."""
    if isinstance(store, (str, os.PathLike)):
        return FeatureStore.open(store, verify=verify)
    return store


def _rewrite_npy_rows(path: Path, rows: int) -> None:
    """Shrink a preallocated ``.npy`` to its first ``rows`` rows in place (header + truncate).

    Idempotent, so a kill in the middle is repaired by the next run.
    """
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if shape[0] != rows:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
                      "shape": (rows, *shape[1:])}
            text = repr(header)
            prefix = 8 + (2 if version == (1, 0) else 4)
            room = offset - prefix
            if len(text) + 1 > room:
                raise InternalError("npy header grew")  # cannot happen: the row count only shrinks
            f.seek(prefix)
            f.write((text.ljust(room - 1) + "\n").encode("latin1"))
        f.flush()
        os.fsync(f.fileno())
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.truncate(offset + rows * row_bytes)


@dataclass
class StoreConfig:
    """What must match for a run to resume a store: models, their exports, data and layout."""

    models: list[str]
    dims: dict[str, int]
    specs: dict[str, dict[str, Any]]
    exports: dict[str, str]  # model → sha256 of features.onnx
    data: dict[str, Any]
    dtype: str
    batch_size: int
    pipeline: str = "exact"  # the image pipeline (data.preprocess.PIPELINES) the rows came from

    def identity(self) -> dict[str, Any]:
        """The fields compared on resume (a store is never resumed with another pipeline)."""
        return {"models": self.models, "exports": self.exports,
                "data_fingerprint": self.data.get("fingerprint"), "dtype": self.dtype,
                "n_samples": self.data.get("n_samples"), "pipeline": self.pipeline}


class StoreWriter:
    """Create or resume a store; write batches of rows in order; commit; finalise.

    The writer takes the store's lock (``.affeq-rt.lock``, :class:`~affeq_rt.io.fsio.FolderLock`)
    for its lifetime — a second run on the same store is refused naming the holder — and
    releases it in :meth:`finalise` or :meth:`close`. ``lock=False`` opens the store for row writes
    without the lock: for workers in other processes (e.g. Ray tasks) of the run whose driver
    holds it; such a writer only calls :meth:`write` (and ``flush``), never commit/finalise, and
    the driver commits a batch only after every worker has flushed its rows.
    """

    def __init__(self, path: str | os.PathLike, cfg: StoreConfig,
                 heads: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                 lock: bool = True) -> None:
        """``heads[m]``: the export's head file rows ``(W [K, d], b [K])``, copied verbatim."""
        if cfg.dtype not in DTYPES:
            raise AffeqError(f"unknown dtype {cfg.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if int(cfg.batch_size) < 1:
            raise AffeqError(f"batch size must be positive, got {cfg.batch_size}",
                             "pass --batch-size ≥ 1")
        for m in cfg.models:
            _safe_name(m)
        self.path = Path(path)
        self.cfg = cfg
        self.n_samples = int(cfg.data["n_samples"])
        self._arrays: dict[str, np.memmap] = {}
        self.resumed = False
        self.already_complete = False
        self.samples_done = 0
        self.rows = 0
        self.skipped: list[dict[str, Any]] = []
        self._lock: FolderLock | None = None
        self._created = False
        try:
            self._open(heads, lock)
        except BaseException:
            self.close()
            if self._created:
                self.discard()
            raise

    def close(self) -> None:
        """Unmap the arrays and release the lock (the store stays resumable)."""
        self._arrays.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def discard(self) -> None:
        """Remove this store's files (a store no rerun can use: nothing was readable, or it
        could not even be created) and the folder if that leaves it empty."""
        self.close()
        for rel in ("progress.json", "images.txt", "labels.npy", LOCK_FILE, "manifest.json"):
            (self.path / rel).unlink(missing_ok=True)
        for m in self.cfg.models:
            shutil.rmtree(self.path / m, ignore_errors=True)
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    # -- setup
    def _progress(self) -> dict[str, Any]:
        """What earlier runs committed to this (unfinished) store: samples, rows, skipped."""
        pf = self.path / "progress.json"
        return read_json(pf, "store progress") if pf.is_file() else {"samples": 0, "rows": 0,
                                                                    "skipped": []}

    def _clear(self, models: Any) -> None:
        """Remove an unfinished store that holds no committed rows (the lock stays held)."""
        for rel in ("progress.json", "images.txt", "labels.npy", "manifest.json"):
            (self.path / rel).unlink(missing_ok=True)
        for m in models if isinstance(models, list) else []:
            if isinstance(m, str) and m and "/" not in m and m not in (".", ".."):
                shutil.rmtree(self.path / m, ignore_errors=True)

    def _open(self, heads: Mapping[str, tuple[np.ndarray, np.ndarray]], lock: bool) -> None:
        mf = self.path / "manifest.json"
        if self.path.exists() and not self.path.is_dir():
            raise AffeqError(f"--out {self.path} is a file", "pass a folder for the store")
        fresh = not mf.is_file()
        if fresh and self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise AffeqError(f"--out {self.path} exists and is not a feature store",
                             "choose an empty or new folder")
        if lock:
            self._lock = FolderLock(self.path, "feature store").acquire()
        if mf.is_file():
            man = read_json(mf, "store manifest")
            prog = None if man.get("complete") else self._progress()
            if prog is not None and not int(prog.get("samples", 0)):
                # nothing committed: no work to keep, so no setting of the run that began it
                # (models, dtype, batch size, data) binds this one; start afresh
                self._clear(man.get("models"))
        if mf.is_file():
            theirs = man.get("identity") or {}
            mine = self.cfg.identity()
            if theirs != mine:
                diff = [k for k in mine if theirs.get(k) != mine[k]]
                what = (f"models {', '.join(man.get('models', []))}" if "models" in diff
                        else ", ".join(diff))
                raise AffeqError(f"{self.path} already holds a different feature store ({what} "
                                 "differ)", "choose another --out folder or delete that one")
            if man.get("complete"):
                self.already_complete = True
                self.rows = int(man["n"])
                self.samples_done = self.n_samples
                self.close()
                return
            self.samples_done, self.rows = int(prog["samples"]), int(prog["rows"])
            self.skipped = list(prog["skipped"])
            self.resumed = True  # (a store with nothing committed was cleared above)
            kept = int(man.get("batch_size") or 0)
            if kept < 1:
                raise AffeqError(f"store {self.path} records no valid batch size "
                                 f"({man.get('batch_size')!r}) yet has committed rows",
                                 f"cannot resume it; {REEXTRACT}")
            self.cfg.batch_size = kept  # committed rows follow that batch grid
            self._prepare_models(heads)
            return
        self._created = not self.path.exists() or not any(
            p.name != LOCK_FILE for p in self.path.iterdir())
        ensure_writable_dir(self.path)
        need = sum(self.n_samples * self.cfg.dims[m] * np.dtype(self.cfg.dtype).itemsize
                   for m in self.cfg.models)
        check_free_space(self.path, need, f"a {self.n_samples}-image feature store")
        write_json_atomic(mf, self._manifest(complete=False))  # first: marks the folder as ours
        self._prepare_models(heads)

    def _prepare_models(self, heads: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Open each model's preallocated array, creating missing ones (only before any commit)."""
        for m in self.cfg.models:
            d = self.path / m
            f = d / "features.npy"
            if not f.is_file() or not (d / "head.safetensors").is_file():
                if self.samples_done > 0:
                    raise AffeqError(f"store {self.path} lost {m}/features.npy mid-run",
                                     "delete the folder and extract again")
                ensure_writable_dir(d)
                w, b = heads[m]
                save_head(d / "head.safetensors", w, b)
                with atomic_path(f) as tmp:
                    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.cfg.dtype,
                                                    shape=(self.n_samples, self.cfg.dims[m]))
                    arr.flush()
                    del arr
                    with open(tmp, "r+b") as fh:  # real blocks: ENOSPC now, never a SIGBUS later
                        preallocate(fh, os.path.getsize(tmp), f)
            else:
                with open(f, "r+b") as fh:  # stores begun before preallocation, or copied sparse
                    preallocate(fh, os.path.getsize(f), f)
            self._arrays[m] = np.load(f, mmap_mode="r+")

    def _manifest(self, complete: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        c = self.cfg
        return {"format": FORMAT, "complete": complete, "models": c.models, "n": self.rows,
                "dtype": c.dtype, "feature_dims": c.dims, "batch_size": c.batch_size,
                "pipeline": c.pipeline,
                "data": c.data, "skipped": self.skipped, "specs": c.specs, "exports": c.exports,
                "identity": c.identity(), "versions": versions(),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}

    # -- writing
    def write(self, model: str, row0: int, feats: np.ndarray) -> None:
        """Put ``feats`` [r, d] at rows ``row0…`` of ``model`` (converted to the store dtype)."""
        arr = self._arrays[model]
        if feats.shape[1] != arr.shape[1]:
            raise AffeqError(f"{model} produced {feats.shape[1]} features, the store expects "
                             f"{arr.shape[1]}", "re-export the model or use a new store")
        if arr.dtype == np.float16:
            _check_float16(model, feats)
        arr[row0:row0 + feats.shape[0]] = feats.astype(arr.dtype, copy=False)

    def commit(self, samples_done: int, rows: int, skipped: Sequence[dict[str, Any]]) -> None:
        """Flush every array to disk, then record the progress atomically."""
        for arr in self._arrays.values():
            arr.flush()
        self.samples_done, self.rows = samples_done, rows
        self.skipped.extend(skipped)
        write_json_atomic(self.path / "progress.json",
                          {"samples": samples_done, "rows": rows, "skipped": self.skipped})

    def finalise(self, samples: Sequence[Any], extra: dict[str, Any] | None = None) -> None:
        """Shrink arrays to the rows written; write images, labels, checksums, final manifest."""
        if self.samples_done != self.n_samples:
            raise InternalError(f"finalise at sample {self.samples_done} of {self.n_samples}")
        for arr in self._arrays.values():
            arr.flush()
        self._arrays.clear()
        bad = {int(s["index"]) for s in self.skipped}
        good = [s for i, s in enumerate(samples) if i not in bad]
        if len(good) != self.rows:
            raise InternalError(f"store bookkeeping: {len(good)} readable samples, "
                                f"{self.rows} rows")
        for m in self.cfg.models:
            _rewrite_npy_rows(self.path / m / "features.npy", self.rows)
        write_bytes_atomic(self.path / "images.txt", encode_image_paths([s.path for s in good]))
        with atomic_path(self.path / "labels.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray([s.label for s in good], np.int64))
        files = ["images.txt", "labels.npy"] + [f"{m}/{f}" for m in self.cfg.models
                                                for f in ("features.npy", "head.safetensors")]
        checksums = {f: sha256_file(self.path / f) for f in files}
        sizes = {f: (self.path / f).stat().st_size for f in files}
        write_json_atomic(self.path / "manifest.json",
                          {**self._manifest(True, extra), "images_encoding": IMAGES_ENCODING,
                           "checksums": checksums, "sizes": sizes})
        (self.path / "progress.json").unlink(missing_ok=True)
        self.already_complete = True
        self.close()
