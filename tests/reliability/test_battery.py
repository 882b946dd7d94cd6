"""The reliability battery (issue 10): bad inputs through the command line, as a user meets them.

Each case builds its input in a fresh folder, runs ``affeq-rt`` in this process
(``affeq_rt.cli.main.main``) and asserts the exit code, exactly one line on stderr (``error:
problem; fix``, never a traceback) naming what is wrong, and that nothing was written: every file
in the case's folder is unchanged (name, size, mtime), no export was started and no cache was
filled. Shared inputs (a labelled feature store, a maps file, a hybrid, export folders) are built
once per module; a case that damages one copies it first. The server's malformed and oversized
requests are ``test_serve_hostile.py`` (they need a running server); Ctrl-C and kill -9 are
``test_interrupt.py``. ``CATEGORIES`` and :func:`tally` count the cases for docs/RELIABILITY.md,
whose table ``test_reliability_doc_tally_is_current`` keeps in step.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affeq_rt.cli.main import main
from affeq_rt.io.maps import AffineMap, MapSet, save_maps

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
import photos  # noqa: E402

TENCH, TABBY = "n01440764", "n02123045"
PAIR = ("mobilenet_v2", "efficientnet_lite0")  # both 1280-d features in the small registry
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos
DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"


@dataclass
class Ctx:
    """What a case builds on: its own empty folder ``work``, an export root that must stay
    empty, and the module's shared inputs (read-only)."""

    work: Path
    exports: Path
    fx: dict[str, Path]

    def copy(self, key: str, name: str | None = None) -> Path:
        """A private copy of shared input ``key`` (to damage) inside ``work``."""
        src = self.fx[key]
        dst = self.work / (name or src.name)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return dst

    def write(self, name: str, data: bytes | str) -> Path:
        """A file ``name`` in ``work`` holding ``data``."""
        p = self.work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
        return p

    def photo(self, name: str = "cat.jpg") -> Path:
        """A small real photo in ``work``."""
        p = self.work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        photos.photo_images()[1][1].resize((64, 48)).save(p)
        return p

    @property
    def cached(self) -> list[str]:
        """``--export-root`` of the module's cached exports (a case that fails only after the
        networks are open; the fixture checks they stay unchanged)."""
        return ["--export-root", str(self.fx["exports"])]

    @property
    def xr(self) -> list[str]:
        """``--export-root`` pointing at the root that must stay empty."""
        return ["--export-root", str(self.exports)]


# ------------------------------------------------------------------ inputs the cases build

def _line_png(c: Ctx) -> list[str]:
    """The issue's 118-byte 1×20000 PNG (5.3 GB and 110 s in predict before the fix)."""
    Image.new("L", (1, 20000), 128).save(c.work / "line.png")
    return ["predict", "mobilenet_v2", str(c.work / "line.png"), *c.xr]


def _bomb_png(c: Ctx) -> list[str]:
    """A decompression bomb (PIL's limit is lowered by the case, so the file stays small)."""
    Image.new("RGB", (300, 300)).save(c.work / "bomb.png")
    return ["predict", "mobilenet_v2", str(c.work / "bomb.png"), *c.xr]


def _extract(c: Ctx, data: Path, *extra: str) -> list[str]:
    return ["extract", "--models", "mobilenet_v2", "--data", str(data), "--out",
            str(c.work / "out"), "--random-weights", "--workers", "0", *c.xr, *extra]


def _kaggle(c: Ctx, explicit: bool) -> list[str]:
    """One unknown wnid among Kaggle val rows (before: every label silently re-indexed)."""
    for i in range(3):
        c.photo(f"val/ILSVRC2012_val_{i + 1:08d}.JPEG")
    wnids = [TENCH, "n99999999", TABBY]
    rows = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4"
                                           for i, w in enumerate(wnids)]
    c.write("LOC_val_solution.csv", "\n".join(rows) + "\n")
    extra = ["--labels", str(c.work / "LOC_val_solution.csv")] if explicit else []
    return _extract(c, c.work / "val", *extra)


def _mixed_folders(c: Ctx) -> list[str]:
    """ImageNet class folders plus one that is not a wnid (before: folder-name order)."""
    c.photo(f"train/{TENCH}/a.jpg")
    c.photo("train/misc/b.jpg")
    return _extract(c, c.work / "train")


def _flat(c: Ctx, n: int = 3) -> Path:
    for i in range(n):
        c.photo(f"flat/img{i}.jpg")
    return c.work / "flat"


def _name_labels(c: Ctx, rows: str) -> list[str]:
    """A flat folder with a ``name,label`` file."""
    folder = _flat(c)
    c.write("labels.csv", rows)
    return _extract(c, folder, "--labels", str(c.work / "labels.csv"), "--dtype", "float32")


def _damaged_store(c: Ctx, damage: Callable[[Path], object], *cmd: str) -> list[str]:
    """A copy of the labelled store with ``damage`` applied, then ``cmd`` on it."""
    store = c.copy("store", "store")
    damage(store)
    return [a.replace("{store}", str(store)).replace("{maps}", str(c.fx["maps"])) for a in cmd]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    import json

    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _evaluate(store: str = "{store}", maps: str = "{maps}") -> list[str]:
    return ["evaluate", "--features", store, "--maps", maps, "--out", "OUT"]


def _damaged_export(c: Ctx, damage: Callable[[Path], object]) -> list[str]:
    exp = c.copy("mobilenet_v2", "mobilenet_v2")
    damage(exp)
    return ["predict", str(exp), str(c.photo())]


def _damaged(c: Ctx, key: str, damage: Callable[[Path], object]) -> Path:
    """A copy of shared input ``key`` with ``damage`` applied."""
    path = c.copy(key)
    damage(path)
    return path


def _junk_features(export: Path) -> None:
    (export / "features.onnx").write_bytes(b"junk")


def _bad_maps(c: Ctx, data: bytes) -> Path:
    return c.write("maps.safetensors", data)


def _torch_file(c: Ctx, obj_code: str) -> Path:
    """A ``.pt`` checkpoint holding the object ``obj_code`` builds (torch imported lazily)."""
    import torch

    p = c.work / "ckpt.pt"
    torch.save(eval(obj_code, {"torch": torch}), p)  # noqa: S307 - test-made literals only
    return p


def _edit_hybrid(c: Ctx, edit: Callable[[dict], object], restamp: bool = True) -> Path:
    """A copy of the shared hybrid whose ``affeq_rt.*`` metadata ``edit`` changed (its checksum
    record re-stamped when ``restamp``, so only the edit is at fault)."""
    import onnx

    from affeq_rt.deploy.metadata import _decoded, set_metadata, stamp_checksum

    path = c.copy("hybrid")
    model = onnx.load(str(path), load_external_data=False)
    meta = _decoded(model)
    edit(meta)
    set_metadata(model, meta)
    path.write_bytes(model.SerializeToString())
    if restamp:
        stamp_checksum(path)
    return path


def _forge_checksum(meta: dict) -> None:
    """The issue's forged record: /etc/passwd as the data file, with its true size and hash."""
    from affeq_rt.io.fsio import sha256_file

    meta["checksum"].update(data_file="/etc/passwd", data_bytes=os.path.getsize("/etc/passwd"),
                            data_sha256=sha256_file("/etc/passwd"))


def _input_size(meta: dict) -> None:
    meta["preprocessing"]["input_size"] = 48  # the graph takes 32×32


def _maps_meta(c: Ctx, edit: Callable[[dict], object]) -> Path:
    """A copy of the shared maps file whose ``affeq_rt`` metadata ``edit`` changed."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(c.fx["maps"]), framework="numpy") as f:
        meta = json.loads(f.metadata()["affeq_rt"])
    tensors = load_file(str(c.fx["maps"]))
    doc = {"meta": meta, "tensors": tensors}
    edit(doc)
    meta = doc["meta"]
    out = c.work / "maps.safetensors"
    save_file(tensors, str(out), metadata={"affeq_rt": json.dumps(meta)})
    return out


def _flat_weight(d: dict) -> None:
    key = f"{PAIR[0]}->{PAIR[1]}.weight"
    d["tensors"][key] = d["tensors"][key][0].copy()


def _kaggle_twice(c: Ctx) -> list[str]:
    """One image listed twice with two classes (before: the last row silently won)."""
    for i in range(2):
        c.photo(f"val/ILSVRC2012_val_{i + 1:08d}.JPEG")
    rows = ["ImageId,PredictionString", f"ILSVRC2012_val_00000001,{TENCH} 1 2 3 4",
            f"ILSVRC2012_val_00000002,{TABBY} 1 2 3 4", f"ILSVRC2012_val_00000001,{TABBY} 5 6 7 8"]
    c.write("LOC_val_solution.csv", "\n".join(rows) + "\n")
    return _extract(c, c.work / "val", "--labels", str(c.work / "LOC_val_solution.csv"))


LONG = "x" * 300  # one name longer than any Linux file system's 255 bytes


def _out(c: Ctx, args: list[str]) -> list[str]:
    """``OUT`` in ``args`` → a path in ``work`` that must not appear."""
    return [str(c.work / "result") if a == "OUT" else a for a in args]


@dataclass(frozen=True)
class Case:
    """One bad input: its category, how to make it (returns the command line), the exit code
    and the fragment the one stderr line must contain."""

    category: str
    name: str
    make: Callable[[Ctx], list[str]]
    message: str
    code: int = 1
    bomb_limit: int | None = None  # PIL.Image.MAX_IMAGE_PIXELS for the case


#: Battery categories, in the order docs/RELIABILITY.md lists them.
CATEGORIES = ["images", "labels", "folders", "stores", "maps", "onnx files", "export folders",
              "checkpoints", "arguments", "server requests"]

CASES = [
    # ------------------------------------------------------------------------------- images
    Case("images", "image 1x20000 png", _line_png, "line.png is 1×20000 pixels"),
    Case("images", "decompression bomb", _bomb_png, "bomb.png is too large to decode safely",
         bomb_limit=300 * 300 // 4),
    Case("images", "image does not exist",
         lambda c: ["predict", "mobilenet_v2", str(c.work / "nope.jpg"), *c.xr],
         "nope.jpg does not exist"),
    Case("images", "corrupt jpeg",
         lambda c: ["predict", "mobilenet_v2", str(c.write("bad.jpg", b"\xff\xd8\xff\xe0 no")),
                    *c.xr], "bad.jpg is not a readable image"),
    Case("images", "truncated jpeg",
         lambda c: ["predict", "mobilenet_v2",
                    str(c.write("cut.jpg", c.photo().read_bytes()[:300])), *c.xr],
         "cut.jpg is not a readable image"),
    Case("images", "empty file",
         lambda c: ["predict", "mobilenet_v2", str(c.write("empty.png", b"")), *c.xr],
         "empty.png is not a readable image"),
    Case("images", "text named .png",
         lambda c: ["predict", "mobilenet_v2", str(c.write("notes.png", "hello\n")), *c.xr],
         "notes.png is not a readable image"),
    Case("images", "folder as image",
         lambda c: ["predict", "mobilenet_v2", str(c.copy("photos", "pics")), *c.xr],
         "pics"),
    Case("images", "second of two images corrupt",
         lambda c: ["predict", "mobilenet_v2", str(c.photo()),
                    str(c.write("bad2.jpg", b"\x89PNG\r\n garbage")), *c.xr],
         "bad2.jpg is not a readable image"),
    Case("images", "hybrid on a corrupt image",
         lambda c: ["predict", str(c.fx["hybrid"]), str(c.write("bad.jpg", b"junk"))],
         "bad.jpg is not a readable image"),
    Case("images", "predict --fp16 on a corrupt image",
         lambda c: ["predict", str(c.fx["mobilenet_v2"]), str(c.write("bad.jpg", b"junk")),
                    "--fp16"], "bad.jpg is not a readable image"),
    Case("images", "cam on a corrupt image",
         lambda c: ["cam", str(c.write("bad.jpg", b"junk")), "--src", str(c.fx["mobilenet_v2"]),
                    "--out", str(c.work / "cam")], "bad.jpg is not a readable image"),
    Case("images", "layers on a corrupt image",
         lambda c: ["layers", str(c.fx["mobilenet_v2"]), str(c.write("bad.jpg", b"junk")),
                    "--out", str(c.work / "layers")], "bad.jpg is not a readable image"),
    # ------------------------------------------------------------------------------- labels
    Case("labels", "kaggle csv unknown wnid (found)", lambda c: _kaggle(c, False),
         "line 3 (ILSVRC2012_val_00000002: 'n99999999')"),
    Case("labels", "kaggle csv unknown wnid (--labels)", lambda c: _kaggle(c, True),
         "line 3 (ILSVRC2012_val_00000002: 'n99999999')"),
    Case("labels", "wnid and other class folders", _mixed_folders,
         "not ImageNet-1k wnids ('misc')"),
    Case("labels", "--labels file does not exist",
         lambda c: _extract(c, _flat(c), "--labels", str(c.work / "nope.csv")), "nope.csv"),
    Case("labels", "name,label file with a word for a label",
         lambda c: _name_labels(c, "img0.jpg,1\nimg1.jpg,cat\nimg2.jpg,3\n"), "labels.csv"),
    Case("labels", "name,label file with a label past the classes",
         lambda c: _name_labels(c, "img0.jpg,1\nimg1.jpg,1000\nimg2.jpg,3\n"), "img1.jpg"),
    Case("labels", "name,label file names a missing image",
         lambda c: _name_labels(c, "img0.jpg,1\nimg9.jpg,2\nimg2.jpg,3\n"), "img9.jpg"),
    Case("labels", "kaggle csv labels one image twice", _kaggle_twice,
         "labels ILSVRC2012_val_00000001 twice with different classes (line 2"),
    Case("labels", "validate: labels disagree with every network",
         lambda c: ["validate", "--features", str(c.fx["store"])],
         "differ from their expected accuracy"),
    # ------------------------------------------------------------------------------ folders
    Case("folders", "extract --data does not exist",
         lambda c: _extract(c, c.work / "nowhere"), "nowhere"),
    Case("folders", "extract --data empty folder",
         lambda c: _extract(c, c.write("empty/.keep", "").parent), "empty"),
    Case("folders", "extract --data holds only corrupt images",
         lambda c: [*_extract(c, c.write("junk/a.jpg", b"junk").parent), *c.cached], "junk"),
    Case("folders", "extract --out is an existing file",
         lambda c: ["extract", "--models", "mobilenet_v2", "--data", str(_flat(c)), "--out",
                    str(c.write("taken", "x")), "--random-weights", "--workers", "0",
                    *c.cached], "taken"),
    Case("folders", "fit --data does not exist",
         lambda c: ["fit", "--models", ",".join(PAIR), "--data", str(c.work / "nowhere"),
                    "--out", str(c.work / "m.safetensors"), "--random-weights", *c.xr],
         "nowhere"),
    Case("folders", "ablate --data does not exist",
         lambda c: ["ablate", "--models", ",".join(PAIR), "--data", str(c.work / "nowhere"),
                    "--out", str(c.work / "ab"), "--maps", str(c.fx["maps"]), *c.xr],
         "nowhere"),
    Case("folders", "build-hybrid --fit-on does not exist",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", PAIR[1], "--fit-on",
                    str(c.work / "nowhere"), "--out", str(c.work / "h.onnx"), *c.xr], "nowhere"),
    # ------------------------------------------------------------------------------- stores
    Case("stores", "evaluate: store does not exist",
         lambda c: _out(c, _evaluate(str(c.work / "nostore"), str(c.fx["maps"]))), "nostore"),
    Case("stores", "validate: store does not exist",
         lambda c: ["validate", "--features", str(c.work / "nostore")], "nostore"),
    Case("stores", "fit --features: store does not exist",
         lambda c: ["fit", "--models", ",".join(PAIR), "--features", str(c.work / "nostore"),
                    "--out", str(c.work / "m.safetensors")], "nostore"),
    Case("stores", "manifest.json not JSON",
         lambda c: _out(c, _damaged_store(c, lambda s: (s / "manifest.json").write_text("{oops"),
                                          *_evaluate())), "manifest.json"),
    Case("stores", "manifest.json missing",
         lambda c: _damaged_store(c, lambda s: (s / "manifest.json").unlink(),
                                  "validate", "--features", "{store}"), "store"),
    Case("stores", "manifest.json a JSON list",
         lambda c: _damaged_store(c, lambda s: (s / "manifest.json").write_text("[1, 2]"),
                                  "validate", "--features", "{store}"), "unknown store format"),
    Case("stores", "features.npy truncated",
         lambda c: _damaged_store(c, lambda s: _truncate(s / PAIR[0] / "features.npy"),
                                  "validate", "--features", "{store}"), "features.npy"),
    Case("stores", "features.npy not an array",
         lambda c: _damaged_store(c, lambda s: (s / PAIR[0] / "features.npy").write_text("x"),
                                  "validate", "--features", "{store}"), "features.npy"),
    Case("stores", "labels.npy garbage",
         lambda c: _damaged_store(c, lambda s: (s / "labels.npy").write_bytes(b"\x93NUMPYjunk"),
                                  "validate", "--features", "{store}"), "labels.npy"),
    Case("stores", "a network's folder missing",
         lambda c: _out(c, _damaged_store(c, lambda s: shutil.rmtree(s / PAIR[1]),
                                          *_evaluate())), PAIR[1]),
    Case("stores", "head.safetensors garbage",
         lambda c: _damaged_store(c, lambda s: (s / PAIR[0] / "head.safetensors").write_bytes(
             b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), "validate", "--features", "{store}"),
         "head.safetensors"),
    Case("stores", "store incomplete (interrupted extract)",
         lambda c: _out(c, _damaged_store(
             c, lambda s: _edit_json(s / "manifest.json", lambda d: d.update(complete=False)),
             *_evaluate())), "is unfinished"),
    Case("stores", "similarity: store does not exist",
         lambda c: ["similarity", "--features", str(c.work / "nostore"), "--out",
                    str(c.work / "sim")], "nostore"),
    Case("stores", "similarity: features.npy truncated",
         lambda c: _damaged_store(c, lambda s: _truncate(s / PAIR[1] / "features.npy"),
                                  "similarity", "--features", "{store}", "--out",
                                  str(c.work / "sim")), "features.npy"),
    Case("stores", "similarity --models names a network not in the store",
         lambda c: ["similarity", "--features", str(c.fx["store"]), "--models",
                    f"{PAIR[0]},googlenet", "--out", str(c.work / "sim")], "googlenet"),
    Case("stores", "validate --models names a network not in the store",
         lambda c: ["validate", "--features", str(c.fx["store"]), "--models", "googlenet"],
         "'googlenet' is not in the feature store"),
    Case("stores", "depth: store does not exist",
         lambda c: ["depth", "--features", str(c.work / "nostore"), "--models", ",".join(PAIR)],
         "nostore"),
    Case("stores", "depth: a store without stages",
         lambda c: ["depth", "--features", str(c.fx["store"]), "--models", ",".join(PAIR)],
         "store"),
    Case("stores", "validate: manifest names a network ../outside",
         lambda c: _damaged_store(c, lambda s: _edit_json(
             s / "manifest.json", lambda d: d["models"].__setitem__(0, "../outside")),
             "validate", "--features", "{store}"), "'../outside' is not a folder of the store"),
    Case("stores", "similarity: manifest names a network ../outside",
         lambda c: _damaged_store(c, lambda s: _edit_json(
             s / "manifest.json", lambda d: d["models"].__setitem__(1, "../outside")),
             "similarity", "--features", "{store}", "--out", str(c.work / "sim")),
         "'../outside' is not a folder of the store"),
    Case("stores", "validate: checksum record names /etc/passwd",
         lambda c: _damaged_store(c, lambda s: _edit_json(
             s / "manifest.json", lambda d: d["checksums"].update({"/etc/passwd": "0" * 64})),
             "validate", "--features", "{store}"), "'/etc/passwd', a path outside the store"),
    Case("stores", "manifest n edited to a word",
         lambda c: _out(c, _damaged_store(c, lambda s: _edit_json(
             s / "manifest.json", lambda d: d.update(n="many")), *_evaluate())),
         "edited or corrupt manifest.json ('n' is 'many'"),
    Case("stores", "manifest feature_dims edited",
         lambda c: _damaged_store(c, lambda s: _edit_json(
             s / "manifest.json", lambda d: d.update(feature_dims=[1280, 1280])),
             "validate", "--features", "{store}"), "'feature_dims' or 'specs' is not an object"),
    # --------------------------------------------------------------------------------- maps
    Case("maps", "evaluate --maps does not exist",
         lambda c: _out(c, _evaluate(str(c.fx["store"]), str(c.work / "none.safetensors"))),
         "none.safetensors"),
    Case("maps", "evaluate --maps garbage",
         lambda c: _out(c, _evaluate(str(c.fx["store"]), str(_bad_maps(c, b"garbage")))),
         "maps.safetensors"),
    Case("maps", "evaluate --maps truncated",
         lambda c: _out(c, _evaluate(str(c.fx["store"]), str(_damaged(c, "maps", _truncate)))),
         "maps.safetensors"),
    Case("maps", "build-hybrid --maps garbage",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", PAIR[1], "--maps",
                    str(_bad_maps(c, b"garbage")), "--out", str(c.work / "h.onnx"), *c.xr],
         "maps.safetensors"),
    Case("maps", "build-hybrid --maps without the pair",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", "googlenet", "--maps",
                    str(c.fx["maps"]), "--out", str(c.work / "h.onnx"), *c.xr], "googlenet"),
    Case("maps", "cam --maps garbage",
         lambda c: ["cam", str(c.photo()), "--src", str(c.fx["mobilenet_v2"]), "--dst",
                    str(c.fx["efficientnet_lite0"]), "--maps", str(_bad_maps(c, b"garbage")),
                    "--out", str(c.work / "cam")], "maps.safetensors"),
    Case("maps", "ablate --maps garbage",
         lambda c: ["ablate", "--models", ",".join(PAIR), "--data", str(c.fx["labelled"]),
                    "--maps", str(_bad_maps(c, b"garbage")), "--out", str(c.work / "ab"),
                    *c.cached],
         "maps.safetensors"),
    Case("maps", "evaluate --maps metadata pairs a list",
         lambda c: _out(c, _evaluate(str(c.fx["store"]), str(_maps_meta(
             c, lambda d: d["meta"].update(pairs=[1, 2]))))), "'pairs' or 'models' is not"),
    Case("maps", "evaluate --maps metadata pair without ->",
         lambda c: _out(c, _evaluate(str(c.fx["store"]), str(_maps_meta(
             c, lambda d: d["meta"]["pairs"].update({"nonsense": {}}))))), "'nonsense'"),
    Case("maps", "build-hybrid --maps with a 1-d weight",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", PAIR[1], "--maps",
                    str(_maps_meta(c, _flat_weight)), "--out", str(c.work / "h.onnx"), *c.xr],
         "not [d_dst, d_src] and [d_dst] floats"),
    Case("maps", "evaluate --maps metadata a JSON list",
         lambda c: _out(c, _evaluate(str(c.fx["store"]), str(_maps_meta(
             c, lambda d: d.update(meta=[1]))))), "not a JSON object"),
    # --------------------------------------------------------------------------- onnx files
    Case("onnx files", "predict: garbage .onnx",
         lambda c: ["predict", str(c.write("h.onnx", b"\x08\x07garbage")), str(c.photo())],
         "h.onnx is not a readable ONNX model"),
    Case("onnx files", "predict --fp16: garbage .onnx",
         lambda c: ["predict", str(c.write("h.onnx", b"\x08\x07garbage")), str(c.photo()),
                    "--fp16"], "h.onnx is not a readable ONNX model"),
    Case("onnx files", "predict: an ONNX that is not a hybrid",
         lambda c: ["predict", str(c.fx["mobilenet_v2"] / "classifier.onnx"), str(c.photo())],
         "not a hybrid built by affeq-rt"),
    Case("onnx files", "predict: hybrid truncated",
         lambda c: ["predict", str(_damaged(c, "hybrid", _truncate)), str(c.photo())], "h.onnx"),
    Case("onnx files", "inspect: garbage .onnx",
         lambda c: ["inspect", str(c.write("h.onnx", b"\x08\x07garbage"))], "h.onnx"),
    Case("onnx files", "inspect: does not exist",
         lambda c: ["inspect", str(c.work / "none.onnx")], "none.onnx"),
    Case("onnx files", "serve: garbage .onnx",
         lambda c: ["serve", str(c.write("h.onnx", b"\x08\x07garbage")), "--port", "0"],
         "h.onnx is not a readable ONNX model"),
    Case("onnx files", "serve: does not exist",
         lambda c: ["serve", str(c.work / "none.onnx"), "--port", "0"], "does not exist"),
    Case("onnx files", "serve: a folder without models",
         lambda c: ["serve", str(c.copy("photos", "pics")), "--port", "0"],
         "holds no model folder"),
    Case("onnx files", "serve: not an .onnx file",
         lambda c: ["serve", str(c.write("notes.txt", "hi")), "--port", "0"],
         "not an .onnx file"),
    Case("onnx files", "cam: export with garbage features.onnx",
         lambda c: ["cam", str(c.photo()), "--src",
                    str(_damaged(c, "mobilenet_v2", _junk_features)), "--out",
                    str(c.work / "cam")], "features.onnx"),
    Case("onnx files", "inspect: checksum record names /etc/passwd",
         lambda c: ["inspect", str(_edit_hybrid(c, _forge_checksum, restamp=False))],
         "checksum record that does not describe its own files"),
    Case("onnx files", "predict --verify: checksum record names /etc/passwd",
         lambda c: ["predict", str(_edit_hybrid(c, _forge_checksum, restamp=False)),
                    str(c.photo()), "--verify"],
         "checksum record that does not describe its own files"),
    Case("onnx files", "predict: hybrid metadata lies about its input",
         lambda c: ["predict", str(_edit_hybrid(c, _input_size)), str(c.photo())],
         "h.onnx"),
    Case("onnx files", "predict --fp16: export with truncated features.onnx",
         lambda c: ["predict", str(_damaged(c, "mobilenet_v2", lambda e: _truncate(
             e / "features.onnx", 0.3))), str(c.photo()), "--fp16"], "features.onnx"),
    Case("onnx files", "predict --fp16: export with features.onnx garbage",
         lambda c: ["predict", str(_damaged(c, "mobilenet_v2", _junk_features)), str(c.photo()),
                    "--fp16"], "features.onnx"),
    # ----------------------------------------------------------------------- export folders
    Case("export folders", "features.onnx tampered",
         lambda c: _damaged_export(c, lambda e: (e / "features.onnx").write_bytes(b"junk")),
         "features.onnx"),
    Case("export folders", "manifest.json missing",
         lambda c: _damaged_export(c, lambda e: (e / "manifest.json").unlink()), "manifest"),
    Case("export folders", "manifest.json not JSON",
         lambda c: _damaged_export(c, lambda e: (e / "manifest.json").write_text("{")),
         "manifest.json"),
    Case("export folders", "manifest.json spec not an object",
         lambda c: _damaged_export(c, lambda e: (e / "manifest.json").write_text('{"spec": 3}')),
         "lacks a spec"),
    Case("export folders", "head.safetensors missing",
         lambda c: _damaged_export(c, lambda e: (e / "head.safetensors").unlink()),
         "head.safetensors"),
    Case("export folders", "layers: export folder tampered",
         lambda c: ["layers", str(_damaged(c, "mobilenet_v2", _junk_features)), str(c.photo()),
                    "--out", str(c.work / "layers")], "features.onnx"),
    # -------------------------------------------------------------------------- checkpoints
    Case("checkpoints", "export --weights does not exist",
         lambda c: ["export", "mobilenet_v2", "--weights", str(c.work / "none.pt"), *c.xr],
         "none.pt"),
    Case("checkpoints", "export --weights garbage",
         lambda c: ["export", "mobilenet_v2", "--weights", str(c.write("w.pt", b"garbage")),
                    *c.xr], "w.pt"),
    Case("checkpoints", "export --weights a tensor, not a state dict",
         lambda c: ["export", "mobilenet_v2", "--weights",
                    str(_torch_file(c, "torch.zeros(3)")), *c.xr], "ckpt.pt"),
    Case("checkpoints", "export --weights of another network",
         lambda c: ["export", "mobilenet_v2", "--weights",
                    str(_torch_file(c, "torch.nn.Linear(3, 2).state_dict()")), *c.xr],
         "ckpt.pt"),
    Case("checkpoints", "export --weights and --random-weights",
         lambda c: ["export", "mobilenet_v2", "--weights", str(c.write("w.pt", b"x")),
                    "--random-weights", *c.xr], "--random-weights"),
    # ---------------------------------------------------------------------------- arguments
    Case("arguments", "predict: unknown network",
         lambda c: ["predict", "mobilenet_v9", str(c.photo()), *c.xr], "mobilenet_v9"),
    Case("arguments", "predict: no images (usage)",
         lambda _: ["predict", "mobilenet_v2"], "Missing argument 'IMAGE'", code=2),
    Case("arguments", "predict --top 0",
         lambda c: ["predict", str(c.fx["mobilenet_v2"]), str(c.photo()), "--top", "0"],
         "--top"),
    Case("arguments", "predict --provider bogus",
         lambda c: ["predict", str(c.fx["mobilenet_v2"]), str(c.photo()), "--provider", "tpu"],
         "unknown provider 'tpu'"),
    Case("arguments", "export: unknown network",
         lambda c: ["export", "resnet_v9000", "--random-weights", *c.xr], "resnet_v9000"),
    Case("arguments", "extract --dtype bogus",
         lambda c: _extract(c, _flat(c), "--dtype", "int8"), "int8"),
    Case("arguments", "extract --batch-size 0",
         lambda c: _extract(c, _flat(c), "--batch-size", "0"), "batch size"),
    Case("arguments", "extract --models empty",
         lambda c: ["extract", "--models", ",", "--data", str(_flat(c)), "--out",
                    str(c.work / "out"), *c.xr], "--models"),
    Case("arguments", "fit --method bogus",
         lambda c: ["fit", "--models", ",".join(PAIR), "--features", str(c.fx["store"]),
                    "--out", str(c.work / "m.safetensors"), "--method", "magic"], "magic"),
    Case("arguments", "fit --holdout 1.5",
         lambda c: ["fit", "--models", ",".join(PAIR), "--features", str(c.fx["store"]),
                    "--out", str(c.work / "m.safetensors"), "--holdout", "1.5"], "holdout"),
    Case("arguments", "fit without --data or --features",
         lambda c: ["fit", "--models", ",".join(PAIR), "--out", str(c.work / "m.safetensors")],
         "--features"),
    Case("arguments", "fit --curve not image counts",
         lambda c: ["fit", "--features", str(c.fx["store"]), "--out",
                    str(c.work / "m.safetensors"), "--curve", "10,x"], "10,x"),
    Case("arguments", "fit --data without --models",
         lambda c: ["fit", "--data", str(c.photo().parent), "--out",
                    str(c.work / "m.safetensors")], "--models"),
    Case("arguments", "fit --models with one network",
         lambda c: ["fit", "--models", PAIR[0], "--features", str(c.fx["store"]), "--out",
                    str(c.work / "m.safetensors")], "two"),
    Case("arguments", "evaluate --pair not A:B",
         lambda c: _out(c, [*_evaluate(str(c.fx["store"]), str(c.fx["maps"])), "--pair", "ab"]),
         "--pair 'ab' is not A:B"),
    Case("arguments", "validate --device bogus",
         lambda c: ["validate", "--features", str(c.fx["store"]), "--device", "tpu"], "tpu"),
    Case("arguments", "build-hybrid: unknown --src",
         lambda c: ["build-hybrid", "--src", "nonet", "--dst", PAIR[1], "--maps",
                    str(c.fx["maps"]), "--out", str(c.work / "h.onnx"), *c.xr], "nonet"),
    Case("arguments", "build-hybrid: both --maps and --fit-on",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", PAIR[1], "--maps",
                    str(c.fx["maps"]), "--fit-on", str(c.work), "--out", str(c.work / "h.onnx"),
                    *c.xr], "both --maps and --fit-on"),
    Case("arguments", "build-hybrid: --out exists",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", PAIR[1], "--maps",
                    str(c.fx["maps"]), "--out", str(c.write("h.onnx", "mine")), *c.xr],
         "already exists"),
    Case("arguments", "cam: unknown --src",
         lambda c: ["cam", str(c.photo()), "--src", "nonet", "--out", str(c.work / "cam"),
                    *c.xr], "nonet"),
    Case("arguments", "layers --layer unknown",
         lambda c: ["layers", str(c.fx["mobilenet_v2"]), str(c.photo()), "--layer", "nolayer",
                    "--out", str(c.work / "layers")], "nolayer"),
    Case("arguments", "ablate --amounts not numbers",
         lambda c: ["ablate", "--models", ",".join(PAIR), "--data", str(c.fx["labelled"]),
                    "--maps", str(c.fx["maps"]), "--amounts", "lots", "--out",
                    str(c.work / "ab"), *c.cached], "lots"),
    Case("arguments", "models: unknown name",
         lambda _: ["models", "mobilenet_v9"], "mobilenet_v9"),
    Case("arguments", "extract --out is a file",
         lambda c: _extract(c, c.photo().parent, "--out", str(c.write("out.txt", "mine"))),
         "out.txt"),
    Case("arguments", "models --tag unknown",
         lambda _: ["models", "--tag", "nosuchtag"], "nosuchtag"),
    Case("arguments", "layers --channels negative",
         lambda c: ["layers", str(c.fx["mobilenet_v2"]), str(c.photo()), "--channels", "-1",
                    "--out", str(c.work / "layers")], "--channels"),
    Case("arguments", "validate --tolerance negative",
         lambda c: ["validate", "--features", str(c.fx["store"]), "--tolerance", "-1"],
         "--tolerance"),
    Case("arguments", "demo --seed not a number (usage)",
         lambda c: ["demo", "--out", str(c.work / "demo"), "--seed", "x"], "'--seed'", code=2),
    Case("arguments", "serve --port out of range",
         lambda c: ["serve", str(c.fx["hybrid"]), "--port", "70000"], "70000"),
    Case("arguments", "serve --provider bogus",
         lambda c: ["serve", str(c.fx["hybrid"]), "--port", "0", "--provider", "tpu"], "tpu"),
    Case("arguments", "extract --out name too long",
         lambda c: _extract(c, _flat(c), "--out", str(c.work / LONG)),
         "longer than the file system allows"),
    Case("arguments", "evaluate --out name too long",
         lambda c: [*_evaluate(str(c.fx["store"]), str(c.fx["maps"]))[:-1], str(c.work / LONG)],
         "longer than the file system allows"),
    Case("arguments", "build-hybrid --out name too long",
         lambda c: ["build-hybrid", "--src", PAIR[0], "--dst", PAIR[1], "--maps",
                    str(c.fx["maps"]), "--out", str(c.work / f"{LONG}.onnx"), *c.xr],
         "longer than the file system allows"),
    Case("arguments", "similarity --out name too long",
         lambda c: ["similarity", "--features", str(c.fx["store"]), "--out",
                    str(c.work / LONG / "sim")], "longer than the file system allows"),
    Case("arguments", "ablate --seed -1 (usage)",
         lambda c: ["ablate", "--models", ",".join(PAIR), "--data", str(c.fx["labelled"]),
                    "--maps", str(c.fx["maps"]), "--seed", "-1", "--out", str(c.work / "ab"),
                    *c.cached], "'--seed'", code=2),
    Case("arguments", "demo --seed -1 (usage)",
         lambda c: ["demo", "--out", str(c.work / "demo"), "--seed", "-1"], "'--seed'", code=2),
    Case("arguments", "unknown option (usage)",
         lambda _: ["predict", "--no-such-option"], "No such option", code=2),
    Case("arguments", "unknown command (usage)",
         lambda _: ["no-such-command"], "No such command 'no-such-command'", code=2),
]


@pytest.fixture(scope="module")
def fx(env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared inputs: a labelled two-network store (random weights, 4 photos in two wnid
    folders), a maps file for the pair, a tiny hybrid, the cached export folders, photos."""
    base = tmp_path_factory.mktemp("battery")
    labelled = base / "labelled"
    for i, (_, im) in enumerate(photos.photo_images()[:4]):
        p = labelled / (TENCH, TABBY)[i % 2] / f"p{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        im.convert("RGB").resize((96, 72)).save(p)
    store = base / "store"
    assert main(["extract", "--models", ",".join(PAIR), "--data", str(labelled), "--out",
                 str(store), "--random-weights", "--export-root", env["exports"], "--workers",
                 "0", "--dtype", "float32", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    maps = [AffineMap(a, b, rng.standard_normal((1280, 1280)).astype(np.float32) / 36,
                      np.zeros(1280, np.float32), "ols", {"images": 4})
            for a, b in (PAIR, PAIR[::-1])]
    save_maps(base / "maps.safetensors", MapSet(maps))
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from test_hybrid import TinyParts

    hybrid = TinyParts(base / "parts").build(base / "h.onnx")
    exports = Path(env["exports"])
    return {"store": store, "maps": base / "maps.safetensors", "hybrid": hybrid,
            "labelled": labelled, "photos": env["photos"], "exports": exports,
            **{m: exports / m for m in PAIR}}


def _snapshot(folder: Path) -> list[tuple[str, int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size if p.is_file() else -1,
                   p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _shared(fx: dict[str, Path]) -> dict[str, object]:
    """Snapshots of the module's own shared inputs (the export cache is left out: other test
    processes may refresh it)."""
    return {k: _snapshot(fx[k]) if fx[k].is_dir() else fx[k].stat().st_mtime_ns
            for k in ("store", "maps", "hybrid", "labelled")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.category}: {c.name}")
def test_bad_input(case: Case, fx: dict[str, Path], tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    exports = tmp_path / "exports"
    home = tmp_path / "home"
    monkeypatch.setenv("AFFEQ_RT_HOME", str(home))
    monkeypatch.chdir(work)
    shared = _shared(fx)
    args = case.make(Ctx(work, exports, fx))
    assert args, "the case did not build its command line"
    if case.bomb_limit is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", case.bomb_limit)
    before = _snapshot(work)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert code == case.code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(("error: ", "1 network(s)", "2 network(s)")), err
    assert case.message in lines[0], lines[0]
    # nothing half-written: the case's own files unchanged, no export begun, no cache filled
    assert _snapshot(work) == before
    assert not exports.exists() or not any(exports.iterdir())
    assert not home.exists() or not any(p.is_file() for p in home.rglob("*"))
    assert _shared(fx) == shared


ESCAPES = ["\x1b[2J\x1b[31mred", "two\nlines", "bell\x07", "rtl\u202eevil", "plain"]


def test_text_from_files_is_printed_escaped(fx: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Label names with escape sequences in a hybrid reached the terminal raw through
    ``predict`` and ``inspect`` (issue 23); a file name with a newline split the one error
    line. Whatever a file holds is printed with its control characters escaped."""
    c = Ctx(tmp_path, tmp_path / "exports", fx)

    def labels(meta: dict) -> None:
        meta["labels"] = [ESCAPES[i % len(ESCAPES)] for i in range(len(meta["labels"]))]

    hybrid = _edit_hybrid(c, labels)
    assert main(["inspect", str(hybrid), "--all-labels"]) == 0
    printed = capsys.readouterr().out
    assert main(["predict", str(hybrid), str(c.photo()), "--top", "7"]) == 0
    printed += capsys.readouterr().out
    for raw in ESCAPES[:-1]:
        assert raw not in printed
    assert all(ch.isprintable() for ch in printed.replace("\n", ""))
    assert "\\x1b[2J\\x1b[31mred" in printed
    assert "two\\nlines" in printed
    assert "rtl\\u202eevil" in printed
    assert "bell\\x07" in printed
    odd = c.write("bad\nname\x1b[31m.jpg", b"junk")
    assert main(["predict", str(hybrid), str(odd)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "bad\\nname\\x1b[31m.jpg" in err


def test_extract_keeps_any_file_name(env, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """File names with a newline, U+2028, an escape sequence or bytes that are not UTF-8:
    ``extract`` (a traceback on non-UTF-8 names before) stores one row per image with its exact
    name, and a labelled run gets the same labels."""
    data = tmp_path / "data"
    names = [b"a-plain.jpg", b"b-new\nline.jpg", b"c-sep\xe2\x80\xa8.jpg", b"d-\xff\xfe.jpg",
             b"e-esc\x1b[31m.jpg"]
    data.mkdir()
    for i, raw in enumerate(names):
        photos.photo_images()[i][1].convert("RGB").resize((64, 48)).save(
            os.fsdecode(os.fsencode(data) + b"/" + raw), format="JPEG")
    out = tmp_path / "store"
    assert main(["extract", "--models", PAIR[0], "--data", str(data), "--out", str(out),
                 "--random-weights", "--export-root", env["exports"], "--workers", "0",
                 "--dtype", "float32", "--quiet"]) == 0, capsys.readouterr().err
    from affeq_rt.io.store import FeatureStore

    st = FeatureStore.open(out, verify=True)
    assert [os.fsencode(Path(p).name) for p in st.images] == names
    assert st.n == len(names)
    assert all(ch.isprintable() for ch in capsys.readouterr().out.replace("\n", ""))


def tally() -> Counter[str]:
    """Cases per category: this file's ``CASES`` and the server's request tables."""
    from reliability.test_serve_hostile import REQUEST_CASES

    counts = Counter(c.category for c in CASES)
    counts["server requests"] += len(REQUEST_CASES)
    return counts


def tally_table() -> str:
    """The Markdown table of :func:`tally` docs/RELIABILITY.md holds between its markers."""
    counts = tally()
    rows = [f"| {cat} | {counts[cat]} |" for cat in CATEGORIES]
    return "\n".join(["| category | cases |", "|---|---|", *rows,
                      f"| **total** | **{sum(counts.values())}** |"])


def test_battery_covers_every_command_and_category(fx: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """At least 60 command-line cases, every category, every command that reads input."""
    from affeq_rt.cli.main import COMMANDS

    counts = tally()
    assert set(counts) <= set(CATEGORIES)
    assert all(counts[c] > 0 for c in CATEGORIES), counts
    assert len(CASES) >= 60
    used = set()
    for i, case in enumerate(CASES):
        work = tmp_path / str(i)
        work.mkdir()
        used.add(case.make(Ctx(work, tmp_path / "x", fx))[0])
    commands = {name for _, name in COMMANDS} - {"info"}  # info reads no input
    assert commands <= used, commands - used


def test_reliability_doc_tally_is_current() -> None:
    """docs/RELIABILITY.md's battery table is :func:`tally_table` (regenerate it from there)."""
    text = DOC.read_text()
    start, end = "<!-- battery-tally -->", "<!-- /battery-tally -->"
    assert start in text, start
    assert end in text, end
    current = text.split(start)[1].split(end)[0].strip()
    assert current == tally_table(), f"update docs/RELIABILITY.md:\n{tally_table()}"


def _between(text: str, name: str) -> str:
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    assert start in text, start
    assert end in text, end
    return text.split(start)[1].split(end)[0]


def _test_exists(ref: str) -> bool:
    """Whether ``tests/FILE.py::test_name`` names a test function defined in that file."""
    import ast

    file, _, name = ref.partition("::")
    path = DOC.parents[1] / file
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def test_every_promise_is_held_by_a_test() -> None:
    """Every row of docs/RELIABILITY.md's promise table names at least one test, each named test
    exists, and the count of promises is the count of rows (issue 23: the tally counts only
    promises with a test). Every other ``tests/…::test_…`` the page cites exists too."""
    import re

    text = DOC.read_text()
    rows = [ln for ln in _between(text, "promises").splitlines()
            if ln.startswith("| ") and not ln.startswith(("| promise |", "|---"))]
    ref = re.compile(r"`(tests/[\w/]+\.py::test_\w+)`")
    assert len(rows) >= 20
    for row in rows:
        refs = ref.findall(row.split("|")[2])
        assert refs, f"a promise without a test: {row}"
        missing = [r for r in refs if not _test_exists(r)]
        assert not missing, f"{row.split('|')[1].strip()}: no such test {missing}"
    assert _between(text, "promise-count") == f"{len(rows)} promises, each held by at least " \
        "one test.", "update the count in docs/RELIABILITY.md"
    cited = [r for r in ref.findall(text) if not _test_exists(r)]
    assert not cited, f"docs/RELIABILITY.md cites tests that do not exist: {cited}"


if __name__ == "__main__":  # print the tally table for docs/RELIABILITY.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("AFFEQ_RT_HOME", "/nonexistent")
    print(tally_table())
