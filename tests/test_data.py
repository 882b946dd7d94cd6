"""Dataset readers on small fixtures in their real layouts, and the decode-once loader."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affeq_rt.data.loader import distinct_specs, iter_batches
from affeq_rt.data.preprocess import load_image, preprocess
from affeq_rt.data.readers import (
    discover,
    imagenet_wnids,
    read_devkit_val,
    read_image_folder,
    read_kaggle_val,
    read_list_file,
    read_unlabelled,
)
from affeq_rt.errors import AffeqError
from affeq_rt.registry.spec import Preprocessing

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402
from procs import children, gone_within  # noqa: E402

# Well-known ImageNet-1k facts (sorted-wnid class index, as timm/torchvision models predict):
TENCH, GOLDFISH, SEA_SNAKE, KIT_FOX, TABBY = "n01440764", "n01443537", "n01751748", "n02119789", \
    "n02123045"
IDX = {TENCH: 0, GOLDFISH: 1, SEA_SNAKE: 65, KIT_FOX: 278, TABBY: 281}
# ILSVRC2012 devkit ids (meta.mat order): kit fox is id 1, sea snake id 490 (the class of
# ILSVRC2012_val_00000001, whose ground-truth line is 490).
DEVKIT_ID = {KIT_FOX: 1, SEA_SNAKE: 490, TENCH: 449, TABBY: 174}

SPEC_A = Preprocessing(64, 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPEC_B = Preprocessing(48, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def imgs() -> list[tuple[str, Image.Image]]:
    return photos.photo_images()[:6]


def _save(im: Image.Image, p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    im.save(p)
    return p


def test_timm_ships_the_sorted_imagenet_list():
    w = imagenet_wnids()
    assert len(w) == 1000
    assert list(w) == sorted(w)
    for wnid, i in IDX.items():
        assert w[i] == wnid


def test_imagenet_class_folders(tmp_path, imgs):
    for j, wnid in enumerate([TABBY, TENCH, SEA_SNAKE]):
        for k in range(2):
            _save(imgs[2 * j + k][1], tmp_path / wnid / f"{wnid}_{k}.JPEG")
    (tmp_path / "n09999999_empty").mkdir()  # an empty class folder is ignored and reported
    src = read_image_folder(tmp_path)
    assert src.kind == "imagenet-folders"
    assert len(src) == 6
    assert {Path(s.path).parent.name: s.label for s in src.samples} == {
        TABBY: IDX[TABBY], TENCH: IDX[TENCH], SEA_SNAKE: IDX[SEA_SNAKE]}
    assert src.extra["label_scheme"] == "imagenet1k-sorted-wnid"
    assert src.extra["empty_class_folders"] == ["n09999999_empty"]
    assert discover(tmp_path).fingerprint() == src.fingerprint()


def test_plain_imagefolder_uses_sorted_names(tmp_path, imgs):
    _save(imgs[0][1], tmp_path / "dogs" / "a.jpg")
    _save(imgs[1][1], tmp_path / "cats" / "deep" / "b.png")
    src = discover(tmp_path)
    assert [(Path(s.path).name, s.label) for s in src.samples] == [("b.png", 0), ("a.jpg", 1)]


def _flat_val(folder: Path, imgs, n: int) -> list[Path]:
    return [_save(imgs[i % len(imgs)][1], folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
            for i in range(n)]


def test_kaggle_val_csv(tmp_path, imgs):
    _flat_val(tmp_path / "val", imgs, 3)
    truth = [SEA_SNAKE, TABBY, TENCH]
    rows = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 30 40 {w} 5 6 70 80" for i, w in enumerate(truth)]
    rows.append(f"ILSVRC2012_val_00000099,{KIT_FOX} 1 2 3 4")  # extra rows (full val csv) are fine
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    src = discover(tmp_path / "val")  # csv found beside the folder
    assert src.kind == "imagenet-val-kaggle"
    assert [s.label for s in src.samples] == [IDX[w] for w in truth]


def _devkit_meta(path: Path, leaves: dict[str, int]) -> None:
    """meta.mat in the devkit's real structure: a 'synsets' struct array, leaves + an inner node."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    recs = [(i, w, w, "", 0, np.zeros((1, 0)), 0, 1300) for w, i in leaves.items()]
    recs.append((1001, "n00001740", "entity", "", 2, np.array([[1, 490]]), 18, 0))
    arr = np.empty((len(recs), 1), dtype=[(f, object) for f in fields])
    for k, r in enumerate(recs):
        arr[k, 0] = r
    savemat(str(path), {"synsets": arr})


def test_devkit_ground_truth_maps_ids_through_meta(tmp_path, imgs):
    _flat_val(tmp_path / "val", imgs, 4)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    _devkit_meta(data / "meta.mat", DEVKIT_ID)
    truth = [SEA_SNAKE, KIT_FOX, TABBY, TENCH, SEA_SNAKE]  # 5 lines, 4 images: a subset is fine
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{DEVKIT_ID[w]}\n" for w in truth))
    src = read_devkit_val(tmp_path / "val", data / "ILSVRC2012_validation_ground_truth.txt")
    assert [s.label for s in src.samples] == [IDX[w] for w in truth[:4]]
    assert src.samples[0].label == 65  # devkit id 490 → sorted index 65, not 489
    # the same through discover with --labels
    again = discover(tmp_path / "val", labels=data / "ILSVRC2012_validation_ground_truth.txt")
    assert again.fingerprint() == src.fingerprint()


def test_devkit_without_meta_is_a_clear_error(tmp_path, imgs):
    _flat_val(tmp_path / "val", imgs, 2)
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n1\n")
    with pytest.raises(AffeqError, match="meta.mat"):
        discover(tmp_path / "val")


def test_label_file_not_matching_images(tmp_path, imgs):
    _flat_val(tmp_path / "val", imgs, 3)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n")
    with pytest.raises(AffeqError, match="have no row"):
        read_kaggle_val(tmp_path / "val", tmp_path / "LOC_val_solution.csv")
    data = tmp_path / "dk"
    data.mkdir()
    _devkit_meta(data / "meta.mat", DEVKIT_ID)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("490\n1\n")  # 2 lines, 3 images
    with pytest.raises(AffeqError, match="no line in"):
        read_devkit_val(tmp_path / "val", data / "ILSVRC2012_validation_ground_truth.txt")


def test_list_file_and_unlabelled(tmp_path, imgs):
    a = _save(imgs[0][1], tmp_path / "x" / "a.jpg")
    _save(imgs[1][1], tmp_path / "x" / "sub" / "b.png")
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,label\n# comment\nx/sub/b.png,7\n{a},3\n")
    src = read_list_file(lst)
    assert [(Path(s.path).name, s.label) for s in src.samples] == [("b.png", 7), ("a.jpg", 3)]
    un = read_unlabelled(tmp_path / "x")
    assert {s.label for s in un.samples} == {-1}
    assert len(un) == 2
    assert discover(tmp_path / "x").kind == "unlabelled"
    # a flat folder with a name,label file whose names are relative to the folder
    (tmp_path / "labels.txt").write_text("a.jpg,4\nsub/b.png,2\n")
    flat = discover(tmp_path / "x", labels=tmp_path / "labels.txt")
    assert [(Path(s.path).name, s.label) for s in flat.samples] == [("a.jpg", 4), ("b.png", 2)]
    lst.write_text("x/missing.jpg,1\n")
    with pytest.raises(AffeqError, match="do not exist"):
        read_list_file(lst)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AffeqError, match="no images"):
        discover(tmp_path / "empty")
    with pytest.raises(AffeqError, match="does not exist"):
        discover(tmp_path / "nope")


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_once_loader(tmp_path, workers):
    good = photos.write_photos(tmp_path, count=7, corrupt=True)
    src = discover(tmp_path)
    assert len(src) == 9  # 7 photos + corrupt + truncated
    specs = [SPEC_A, Preprocessing(**vars(SPEC_A)), SPEC_B]  # two share a preprocessing key
    assert len(distinct_specs(specs)) == 2
    batches = list(iter_batches(src.samples, specs, batch_size=4, workers=workers,
                                pipeline="exact"))
    assert [(b.start, b.stop) for b in batches] == [(0, 4), (4, 8), (8, 9)]
    ok = np.concatenate([b.ok for b in batches])
    assert ok.sum() == len(good)
    skipped = [s for b in batches for s in b.skipped]
    # mid-list, across two batches: sorted, the corrupt file is sample 1, the truncated one 3
    assert [(i, Path(p).name) for i, p, _ in skipped] == [(1, photos.CORRUPT),
                                                          (3, photos.TRUNCATED)]
    assert all("not a readable image" in r for _, _, r in skipped)
    rows_a = np.concatenate([b.tensors[next(iter(b.tensors))] for b in batches])
    assert rows_a.shape == (len(good), 3, 64, 64)
    # every tensor equals the single-image preprocessing of that file
    readable = [s.path for s, o in zip(src.samples, ok, strict=True) if o]
    for i in (0, len(good) - 1):
        np.testing.assert_array_equal(rows_a[i], preprocess(load_image(readable[i]), SPEC_A))
    keys = list(batches[0].tensors)
    assert batches[0].tensors[keys[1]].shape[2:] == (48, 48)


@pytest.mark.parametrize("pipeline", ["exact", "pillow", "torchvision"])
def test_loader_is_byte_identical_across_workers_and_resume(tmp_path, pipeline):
    """Every worker count runs the same per-image code into uint8 crops and the same batch
    normalisation, so for a fixed pipeline the tensors are equal bit for bit, resumed or not
    (what keeps a store byte-identical across --workers and resume)."""
    if pipeline == "torchvision":
        pytest.importorskip("torchvision")
    photos.write_photos(tmp_path, count=9, corrupt=True)
    src = discover(tmp_path)
    specs = [SPEC_A, SPEC_B]

    def rows(workers: int, start: int = 0) -> dict:
        out: dict = {}
        for b in iter_batches(src.samples, specs, batch_size=3, workers=workers, start=start,
                              pipeline=pipeline):
            out[b.start] = (b.ok.tobytes(), {k.input_size: v.tobytes()
                                             for k, v in b.tensors.items()})
        return out

    ref = rows(0)
    assert sorted(ref) == [0, 3, 6, 9]
    assert rows(1) == ref
    assert rows(2) == ref
    assert rows(2, start=6) == {b: ref[b] for b in (6, 9)}
    # a consumer that stops early leaves no decode process and no slot open
    it = iter_batches(src.samples, specs, batch_size=3, workers=2, pipeline=pipeline)
    next(it)
    assert len(children(os.getpid())) == 2  # the workers
    assert _open_slots() == 4  # 2·workers slots
    it.close()
    assert children(os.getpid()) == []
    assert _open_slots() == 0


def _open_slots() -> int:
    """This process's open decode slots (anonymous memory files; an mmap holds its own fd)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith("/memfd:affeq-rt-slot"):
                inodes.add(fd.stat().st_ino)
    return len(inodes)


KILLED_LOADER = """
import sys, time
from affeq_rt.data.readers import discover
from affeq_rt.data.loader import iter_batches
from affeq_rt.registry.spec import Preprocessing
spec = Preprocessing(**eval(sys.argv[2]))
for b in iter_batches(discover(sys.argv[1]).samples * 50, [spec], batch_size=2, workers=2):
    print(b.start, flush=True)
    time.sleep(0.05)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_loader_leaves_no_decode_process_and_nothing_in_dev_shm(tmp_path):
    """A loader killed with SIGKILL (its whole process group): its decode processes, in a
    session of their own, exit at their pipe's EOF; its slots have no name, so nothing is left
    in /dev/shm (issue 23; named slots used to be left there, 26 on one machine)."""
    import signal
    import subprocess

    photos.write_photos(tmp_path, count=4, corrupt=False)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_LOADER, str(tmp_path),
                             repr(vars(SPEC_B))], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "0", "the loader never yielded"
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        shm = sorted(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else []
        assert not [n for n in shm if str(proc.pid) in n]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # A decode process notices at its next read or write of the pipe: at once when idle,
        # after its batch (2 small photos, ~0.1 s) when busy; 10 s leaves room for a loaded
        # machine.
        assert gone_within(workers, 10) == [], "a decode process outlived its loader"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_a_decode_process_killed_from_outside_is_one_error_naming_its_images(tmp_path):
    """A decode process that dies on its own (the OOM killer, a stray kill) is one AffeqError
    naming the signal and its images, never a wait for its lost batch; the other process is
    stopped too."""
    import signal

    photos.write_photos(tmp_path, count=4, corrupt=False)
    it = iter_batches(discover(tmp_path).samples * 20, [SPEC_B], batch_size=2, workers=2)
    next(it)
    workers = children(os.getpid())
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    with pytest.raises(AffeqError, match=rf"decode process \(pid {workers[0]}\) was killed by "
                                         r"SIGKILL while decoding images \d+-\d+; .*rerun") as e:
        for _ in it:
            pass
    assert "\n" not in str(e.value)
    assert children(os.getpid()) == []


def test_default_workers_is_in_process_on_small_machines():
    """Up to MIN_CPUS_FOR_WORKERS CPUs the networks already use every core: no decode
    processes; above, half the CPUs, capped."""
    from affeq_rt.data.loader import MAX_AUTO_WORKERS, MIN_CPUS_FOR_WORKERS, default_workers

    assert [default_workers(c) for c in (1, 2, MIN_CPUS_FOR_WORKERS)] == [0, 0, 0]
    assert default_workers(16) == 8
    assert default_workers(64) == MAX_AUTO_WORKERS
    assert default_workers() >= 0


def test_loader_resumes_on_the_same_grid(tmp_path):
    photos.write_photos(tmp_path, count=6, corrupt=False)
    src = discover(tmp_path)
    full = list(iter_batches(src.samples, [SPEC_B], batch_size=2, workers=0))
    tail = list(iter_batches(src.samples, [SPEC_B], batch_size=2, workers=0, start=4))
    assert [(b.start, b.stop) for b in tail] == [(4, 6)]
    key = next(iter(tail[0].tensors))
    np.testing.assert_array_equal(tail[0].tensors[key], full[2].tensors[key])


# ------------------------------------------------------------ labels all-or-error (issue 10)

def test_one_unknown_wnid_in_kaggle_csv_is_an_error_naming_the_row(tmp_path, imgs):
    """Before: one stray wnid switched every label to folder-name order, silently."""
    _flat_val(tmp_path / "val", imgs, 3)
    rows = ["ImageId,PredictionString",
            f"ILSVRC2012_val_00000001,{SEA_SNAKE} 1 2 3 4",
            "ILSVRC2012_val_00000002,n99999999 1 2 3 4",  # not an ImageNet-1k class
            f"ILSVRC2012_val_00000003,{TENCH} 1 2 3 4"]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(AffeqError) as e:
        discover(tmp_path / "val")
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 row(s)" in msg
    assert "line 3 (ILSVRC2012_val_00000002: 'n99999999')" in msg


def test_mixed_wnid_and_other_class_folders_is_an_error(tmp_path, imgs):
    _save(imgs[0][1], tmp_path / TENCH / "a.jpg")
    _save(imgs[1][1], tmp_path / "misc" / "b.jpg")
    with pytest.raises(AffeqError, match=r"1 of 2 classes .* not ImageNet-1k wnids \('misc'\)"):
        discover(tmp_path)


@pytest.mark.parametrize("target", [".", "..", TABBY, "outside"])
def test_symlink_that_revisits_a_folder_is_skipped_and_reported(tmp_path, imgs, target):
    """``loop -> .`` became an extra class and every image was extracted twice; a link to a
    folder outside the tree is still a class."""
    root = tmp_path / "train"
    for j, wnid in enumerate([TABBY, TENCH]):
        _save(imgs[j][1], root / wnid / f"{j}.jpg")
    if target == "outside":
        _save(imgs[2][1], tmp_path / "elsewhere" / "c.jpg")
        (root / SEA_SNAKE).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    else:
        (root / "loop").symlink_to(target, target_is_directory=True)
    src = discover(root)
    labels = sorted(s.label for s in src.samples)
    if target == "outside":
        assert labels == sorted([IDX[TABBY], IDX[TENCH], IDX[SEA_SNAKE]])
        assert "skipped_symlinks" not in src.extra
    else:
        assert labels == sorted([IDX[TABBY], IDX[TENCH]])
        assert src.extra["skipped_symlinks"] == ["loop"]
        assert src.extra["classes"] == 2
