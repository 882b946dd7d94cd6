"""Dataset readers (ImageNet layouts, ImageFolder, list files, plain folders) → ``DataSource``.

Readers return a :class:`DataSource`: a list of ``Sample(path, label)`` plus a description for
manifests. Labels are the class index a timm/torchvision ImageNet model predicts (the index of the
wnid in the sorted ImageNet-1k wnid list); ``-1`` means unknown. The decode-once loader that
turns samples into batches is :mod:`affeq_rt.data.loader`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from affeq_rt.errors import AffeqError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                        ".ppm", ".pgm", ".jfif"})
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
_WNID = re.compile(r"^n\d{8}$")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


class Sample(NamedTuple):
    """One image file and its class index (-1 = unknown)."""

    path: str
    label: int


def check_max_images(max_images: int | None) -> None:
    """AffeqError for a ``--max-images`` that is not a positive count (None: every image)."""
    if max_images is not None and int(max_images) < 1:
        raise AffeqError(f"--max-images must be positive, got {max_images}",
                         "pass --max-images ≥ 1 or leave it out")


@dataclass
class DataSource:
    """What a reader found: the samples (sorted, deterministic) and a description for manifests."""

    samples: list[Sample]
    kind: str
    root: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """SHA-256 over every (absolute path, label): two runs on the same data agree, whether
        ``--data`` was given relative or absolute, others do not. File names may hold any bytes
        (a newline, non-UTF-8): the path's bytes are hashed, its length first."""
        h = hashlib.sha256()
        for s in self.samples:
            raw = os.fsencode(os.path.abspath(s.path))
            h.update(b"%d:%s\t%d\n" % (len(raw), raw, s.label))
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able description: kind, root, count, fingerprint and reader details."""
        return {"kind": self.kind, "root": self.root, "n_samples": len(self.samples),
                "fingerprint": self.fingerprint(), **self.extra}

    def head(self, n: int | None) -> DataSource:
        """The first ``n`` samples (all when ``n`` is None)."""
        check_max_images(n)
        if n is None or n >= len(self.samples):
            return self
        return DataSource(self.samples[:n], self.kind, self.root, {**self.extra, "max_images": n})


# ---------------------------------------------------------------------------------------------
# class lists


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids, sorted (timm's ``imagenet_synsets.txt``), or () if absent.

    Read from timm's package data without importing timm (heavy).
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return ()
    root = Path(next(iter(spec.submodule_search_locations)))
    p = root / "data" / "_info" / "imagenet_synsets.txt"
    try:
        wnids = tuple(w.strip() for w in p.read_text().split() if w.strip())
    except OSError:
        return ()
    return wnids if len(wnids) == 1000 else ()


def wnid_labels(wnids: Sequence[str], *, require_imagenet: bool = False,
                where: str = "the class names") -> tuple[dict[str, int], str]:
    """Map wnids to the class index ImageNet models predict — all or error.

    If every wnid is an ImageNet-1k class, its index in the sorted 1000-class list (so a folder of
    ten ImageNet classes still gets the labels a 1000-class model predicts); if none is, the index
    in the sorted list of the given names (plain ImageFolder semantics). A mix — some ImageNet-1k
    wnids, some not — is an AffeqError naming the others (one stray name must not switch every
    label to folder-name order), and so is any name outside ImageNet-1k when
    ``require_imagenet`` (label files that hold wnids). Returns (mapping, scheme).
    """
    names = sorted(set(wnids))
    ref = imagenet_wnids()
    if require_imagenet and not ref:
        raise AffeqError(f"{where} are ImageNet wnids, and the ImageNet-1k wnid list (timm's) is "
                         "not installed", "pip install timm")
    known = set(ref).intersection(names)
    if ref and len(known) == len(names):
        index = {w: i for i, w in enumerate(ref)}
        return {w: index[w] for w in names}, "imagenet1k-sorted-wnid"
    if require_imagenet or known:
        bad = [w for w in names if w not in known]
        raise AffeqError(
            f"{len(bad)} of {len(names)} classes in {where} are not ImageNet-1k wnids "
            f"({', '.join(map(repr, bad[:5]))}{', …' if len(bad) > 5 else ''}) while "
            f"{len(known)} are", "remove or rename those classes (labels are all ImageNet-1k "
            "wnids or all plain class names, never a mix)")
    return {w: i for i, w in enumerate(names)}, "sorted-folder-names"


# ---------------------------------------------------------------------------------------------
# readers


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in it if _is_image(p)), key=lambda p: str(p))


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise AffeqError(f"data folder {path} does not exist", "check --data")
    if not path.is_dir():
        raise AffeqError(f"{path} is not a folder", "pass a folder of images or a list file")


def _is_within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_folders(root: Path) -> tuple[list[str], list[str]]:
    """The class folders of ``root`` (sorted names) and the symlinked ones skipped because they
    revisit a folder: a link to ``root``, to a folder above it, to a folder inside the tree, or
    to the same target as another class folder (e.g. ``loop -> .``). Links elsewhere are
    classes."""
    real_root = os.path.realpath(root)
    classes: list[str] = []
    revisits: list[str] = []
    targets: set[str] = set()
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink():
            target = os.path.realpath(p)
            if (_is_within(target, real_root) or _is_within(real_root, target)
                    or target in targets):
                revisits.append(p.name)
                continue
            targets.add(target)
        classes.append(p.name)
    return classes, revisits


def read_image_folder(root: str | os.PathLike) -> DataSource:
    """ImageNet train/val in one folder per class (wnids), or any ImageFolder-style tree.

    Images may sit at any depth below their class folder (symlinked sub-folders are not
    followed). Class folders without images are ignored (as torchvision does not: it errors — we
    report them in ``extra``); symlinked class folders that revisit a folder of the tree (or one
    above it) are skipped and reported in ``extra["skipped_symlinks"]``.
    """
    root = Path(root)
    _require_dir(root)
    classes, revisits = _class_folders(root)
    per_class = {c: _images_in(root / c, recursive=True) for c in classes}
    used = [c for c in classes if per_class[c]]
    if not used:
        raise AffeqError(f"no images found in the class folders of {root}",
                         "pass a folder holding one sub-folder of images per class")
    mapping, scheme = wnid_labels(used, where=f"the class folders of {root}")
    samples = [Sample(str(p), mapping[c]) for c in used for p in per_class[c]]
    empty = [c for c in classes if not per_class[c]]
    kind = "imagenet-folders" if all(_WNID.match(c) for c in used) else "image-folder"
    extra: dict[str, Any] = {"classes": len(used), "label_scheme": scheme,
                             "empty_class_folders": empty}
    if revisits:
        extra["skipped_symlinks"] = revisits
    return DataSource(samples, kind, str(root.resolve()), extra)


def read_unlabelled(root: str | os.PathLike) -> DataSource:
    """A plain folder of images (searched recursively): every label is -1."""
    root = Path(root)
    _require_dir(root)
    imgs = _images_in(root, recursive=True)
    if not imgs:
        raise AffeqError(f"no images found in {root}",
                         f"put image files ({', '.join(sorted(IMAGE_EXTS)[:5])}, …) there")
    return DataSource([Sample(str(p), -1) for p in imgs], "unlabelled", str(root.resolve()))


def read_list_file(path: str | os.PathLike, base: str | os.PathLike | None = None) -> DataSource:
    """A text/CSV file of ``path,label`` lines (label optional → -1); relative paths are taken
    relative to ``base`` (default: the list file's folder). A header line and ``#`` comments are
    allowed."""
    path = Path(path)
    if not path.is_file():
        raise AffeqError(f"list file {path} does not exist", "check --data")
    base = Path(base) if base is not None else path.parent
    samples: list[Sample] = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            p = row[0].strip()
            lab = row[1].strip() if len(row) > 1 else ""
            if lineno == 1 and lab and not re.fullmatch(r"-?\d+", lab):
                continue  # header
            try:
                label = int(lab) if lab else -1
            except ValueError:
                raise AffeqError(f"{path}:{lineno}: label {lab!r} is not an integer",
                                 "write lines as path,label with an integer class index") from None
            q = Path(p) if os.path.isabs(p) else base / p
            samples.append(Sample(str(q), label))
    if not samples:
        raise AffeqError(f"list file {path} names no images", "write one path,label per line")
    missing = [s.path for s in samples if not Path(s.path).exists()]
    if missing:
        raise AffeqError(f"list file {path} names {len(missing)} file(s) that do not exist "
                         f"(first: {missing[0]})", "fix the paths in the list file")
    return DataSource(samples, "list-file", str(path.resolve()))


def _val_index(p: Path) -> int | None:
    m = _VAL_NAME.search(p.stem)
    return int(m.group(1)) if m else None


def read_kaggle_val(folder: str | os.PathLike, csv_path: str | os.PathLike) -> DataSource:
    """Flat validation folder + Kaggle ``LOC_val_solution.csv`` (ImageId, PredictionString whose
    first token is the wnid)."""
    folder, csv_path = Path(folder), Path(csv_path)
    _require_dir(folder)
    truth: dict[str, str] = {}
    line_of: dict[str, int] = {}
    try:
        with open(csv_path, newline="", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            for row in reader:
                image_id = row["ImageId"].strip()
                wnid = row["PredictionString"].split()[0]
                if image_id in truth and truth[image_id] != wnid:  # all or error: no silent pick
                    raise AffeqError(
                        f"{csv_path} labels {image_id} twice with different classes (line "
                        f"{line_of[image_id]}: {truth[image_id]!r}, line {reader.line_num}: "
                        f"{wnid!r})", "keep one row per image")
                truth[image_id] = wnid
                line_of.setdefault(image_id, reader.line_num)
    except (KeyError, IndexError, AttributeError, csv.Error) as e:
        raise AffeqError(f"{csv_path} is not a Kaggle LOC_val_solution.csv ({e})",
                         "pass the file with columns ImageId,PredictionString") from None
    imgs = _images_in(folder)
    if not imgs:
        raise AffeqError(f"no images found in {folder}", "check --data")
    unknown = [p.name for p in imgs if p.stem not in truth]
    if unknown:
        raise AffeqError(f"{len(unknown)} image(s) in {folder} have no row in {csv_path.name} "
                         f"(first: {unknown[0]})", "pass the label file that matches these images")
    ref = set(imagenet_wnids())
    bad = [p.stem for p in imgs if ref and truth[p.stem] not in ref]
    if bad:
        rows = ", ".join(f"line {line_of[i]} ({i}: {truth[i]!r})" for i in bad[:3])
        raise AffeqError(f"{len(bad)} row(s) of {csv_path} name a class that is not an "
                         f"ImageNet-1k wnid: {rows}{', …' if len(bad) > 3 else ''}",
                         "fix those rows or remove their images (labels are all or nothing)")
    mapping, scheme = wnid_labels([truth[p.stem] for p in imgs], require_imagenet=True,
                                  where=csv_path.name)
    samples = [Sample(str(p), mapping[truth[p.stem]]) for p in imgs]
    return DataSource(samples, "imagenet-val-kaggle", str(folder.resolve()),
                      {"labels_file": str(csv_path.resolve()), "label_scheme": scheme})


def read_devkit_meta(meta: str | os.PathLike) -> dict[int, str]:
    """ILSVRC2012_ID → wnid from the devkit's ``meta.mat`` (leaf synsets) or a ``map_clsloc.txt``
    style table (``wnid id name`` per line)."""
    meta = Path(meta)
    if not meta.is_file():
        raise AffeqError(f"devkit meta file {meta} does not exist",
                         "pass ILSVRC2012_devkit_t12/data/meta.mat with --meta")
    if meta.suffix.lower() == ".mat":
        try:
            from scipy.io import loadmat

            syn = loadmat(str(meta), squeeze_me=True)["synsets"]
            out = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in syn
                   if int(s["num_children"]) == 0}
        except ImportError:
            raise AffeqError("reading meta.mat needs scipy", "pip install scipy") from None
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise AffeqError(f"{meta} is not the ILSVRC2012 devkit meta.mat ({e})",
                             "pass ILSVRC2012_devkit_t12/data/meta.mat") from None
    else:
        out = {}
        for line in meta.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and _WNID.match(parts[0]) and parts[1].isdigit():
                out[int(parts[1])] = parts[0]
    if not out:
        raise AffeqError(f"{meta} holds no ILSVRC2012_ID → wnid entries",
                         "pass the devkit's meta.mat or map_clsloc.txt")
    return out


def _find_devkit_meta(gt: Path) -> Path | None:
    for cand in (gt.parent / "meta.mat", gt.parent / "map_clsloc.txt",
                 gt.parent.parent / "data" / "meta.mat"):
        if cand.is_file():
            return cand
    return None


def read_devkit_val(folder: str | os.PathLike, gt_path: str | os.PathLike,
                    meta: str | os.PathLike | None = None) -> DataSource:
    """Flat validation folder + devkit ``ILSVRC2012_validation_ground_truth.txt``.

    Line i of the ground truth is the ILSVRC2012_ID (1..1000, devkit ``meta.mat`` order — NOT the
    sorted-wnid order models predict) of ``ILSVRC2012_val_{i:08d}``; we map it through the devkit
    meta (found beside the ground-truth file, or given) to a wnid, then to the sorted-wnid index.
    """
    folder, gt_path = Path(folder), Path(gt_path)
    _require_dir(folder)
    try:
        ids = [int(t) for t in gt_path.read_text().split()]
    except (OSError, ValueError) as e:
        raise AffeqError(f"{gt_path} is not a devkit ground-truth file ({e})",
                         "pass ILSVRC2012_validation_ground_truth.txt (one id per line)") from None
    meta_path = Path(meta) if meta else _find_devkit_meta(gt_path)
    if meta_path is None:
        raise AffeqError(f"{gt_path.name} holds devkit ILSVRC2012_IDs, which need the devkit's "
                         "meta.mat to become model labels",
                         "pass --meta ILSVRC2012_devkit_t12/data/meta.mat")
    id2wnid = read_devkit_meta(meta_path)
    bad = sorted({i for i in ids if i not in id2wnid})
    if bad:
        raise AffeqError(f"{gt_path.name} uses class id(s) {bad[:5]} missing from {meta_path.name}",
                         "pass the meta.mat of the same devkit")
    imgs = _images_in(folder)
    if not imgs:
        raise AffeqError(f"no images found in {folder}", "check --data")
    idx = {p: _val_index(p) for p in imgs}
    unmatched = [p.name for p, i in idx.items() if i is None or not 1 <= i <= len(ids)]
    if unmatched:
        raise AffeqError(f"{len(unmatched)} image(s) in {folder} have no line in {gt_path.name} "
                         f"({len(ids)} lines; first: {unmatched[0]})",
                         "pass the ground-truth file that matches these images")
    mapping, scheme = wnid_labels(list(id2wnid.values()), require_imagenet=True,
                                  where=meta_path.name)
    samples = [Sample(str(p), mapping[id2wnid[ids[idx[p] - 1]]]) for p in imgs]
    return DataSource(samples, "imagenet-val-devkit", str(folder.resolve()),
                      {"labels_file": str(gt_path.resolve()), "meta": str(meta_path.resolve()),
                       "label_scheme": scheme})


def read_labelled_flat(folder: str | os.PathLike, labels: str | os.PathLike,
                       meta: str | os.PathLike | None = None) -> DataSource:
    """Flat folder with a label file: Kaggle CSV, devkit ground truth, or a ``name,label`` list."""
    labels = Path(labels)
    if not labels.is_file():
        raise AffeqError(f"label file {labels} does not exist", "check --labels")
    if labels.name == KAGGLE_VAL_CSV or labels.suffix.lower() == ".csv" and \
            labels.read_text(errors="replace").startswith("ImageId"):
        return read_kaggle_val(folder, labels)
    if labels.name == DEVKIT_GT or "ground_truth" in labels.name:
        return read_devkit_val(folder, labels, meta)
    # name,label list with names relative to the folder
    src = read_list_file(labels, base=folder)
    return DataSource(src.samples, "list-file", str(labels.resolve()),
                      {"folder": str(Path(folder).resolve())})


def discover(data: str | os.PathLike, labels: str | os.PathLike | None = None,
             meta: str | os.PathLike | None = None) -> DataSource:
    """Pick the reader for ``data``: a list file; a folder of class folders; a flat folder with
    (given or found) Kaggle/devkit labels; otherwise a plain unlabelled folder."""
    p = Path(data)
    if not p.exists():
        raise AffeqError(f"data path {p} does not exist", "check --data")
    if p.is_file():
        return read_list_file(p)
    if labels is not None:
        return read_labelled_flat(p, labels, meta)
    subdirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
    flat = _images_in(p)
    if subdirs and not flat:
        return read_image_folder(p)
    for cand in (p / KAGGLE_VAL_CSV, p.parent / KAGGLE_VAL_CSV):
        if cand.is_file():
            return read_kaggle_val(p, cand)
    for cand in (p / DEVKIT_GT, p.parent / DEVKIT_GT):
        if cand.is_file():
            return read_devkit_val(p, cand, meta)
    return read_unlabelled(p)
