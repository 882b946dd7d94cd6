"""Robustness ablations: does a hybrid inherit the robustness of its feature extractor or of its
classifier? Each image is decoded once, corrupted once per corruption (the same noise for every
network), then preprocessed per network; every network and every hybrid C_B(M·F_A) (B's head
folded into the map, float64) scores it: top-1 accuracy with labels, agreement with its own
clean prediction without, and the mean confidence (top softmax probability)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affeq_rt.data.labels import softmax
from affeq_rt.data.preprocess import load_image, preprocess, preprocess_key
from affeq_rt.data.readers import DataSource
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import MapSet
from affeq_rt.method.extract import ImageOptions, check_image_options, load_data
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import OrtModel, create_session
from affeq_rt.progress import Progress, or_silent
from affeq_rt.vis.common import as_mapset, hybrid_head, pair_map, resolve_export
from affeq_rt.vis.corrupt import SALT_PEPPER_AMOUNTS, Corruption, default_corruptions
from affeq_rt.vis.figures import ablation_png, img_tag, page
from affeq_rt.vis.results import AblationTable


@dataclass(frozen=True)
class AblateOptions:
    """What :func:`ablate` corrupts, and on how many images (how images are read and run:
    ``ImageOptions``)."""

    amounts: tuple[float, ...] = SALT_PEPPER_AMOUNTS  # salt-and-pepper λ (fractions of H·W·C)
    corruptions: tuple[Corruption, ...] | None = None  # the columns (default: from ``amounts``)
    max_images: int | None = None  # use only the first N images
    seed: int = 0  # seed of the salt-and-pepper noise (with each image's index and column)


#: ablate's image options when none are given: 64 images per batch (ImageOptions' default is 32)
ABLATE_IMAGES = ImageOptions(batch_size=64)


@dataclass
class _Net:
    name: str
    spec: Any
    session: OrtModel
    head: Head


_Row = tuple[str, int, np.ndarray, np.ndarray]  # name, index of the network it reads, W, b


def _open(target: str | os.PathLike, opt: ImageOptions) -> _Net:
    exp: ExportedBackbone = resolve_export(target, opt.export_root, opt.random_weights)
    return _Net(exp.name, exp.spec, create_session(exp.features_path, provider=opt.provider),
                exp.classifier_head())


def _open_all(models: Sequence[str | os.PathLike], opt: ImageOptions) -> list[_Net]:
    """Every network, each named once, all over one label set."""
    nets = [_open(m, opt) for m in models]
    names = [n.name for n in nets]
    if len(set(names)) != len(names):
        raise AffeqError(f"a network is named twice in {', '.join(names)}", "name each once")
    k = nets[0].head.num_classes
    for n in nets:
        if n.head.num_classes != k:
            raise AffeqError(f"{n.name} scores {n.head.num_classes} classes, {nets[0].name} {k}",
                             "ablate networks with one label set")
    return nets


def _rows(nets: Sequence[_Net], maps: str | os.PathLike | MapSet | None) -> list[_Row]:
    """The table's rows: each network, then (with ``maps``) every hybrid A→B, float64 heads."""
    rows: list[_Row] = [
        (n.name, i, n.head.weight.astype(np.float64), n.head.bias.astype(np.float64))
        for i, n in enumerate(nets)]
    if maps is not None and len(nets) > 1:
        mset = as_mapset(maps)
        for i, a in enumerate(nets):
            for b in nets:
                if a is not b:
                    h = hybrid_head(pair_map(mset, a.name, b.name, a.head.dim, b.head.dim),
                                    b.head)
                    rows.append((f"{a.name}→{b.name}", i, h.weight, h.bias))
    return rows


def _labelled(src: DataSource) -> bool:
    """True when every image has a label; AffeqError when only some have."""
    lab = np.array([s.label for s in src.samples], np.int64)
    labelled = bool((lab >= 0).all()) and len(lab) > 0
    if (lab >= 0).any() and not labelled:
        raise AffeqError("some images have labels and some do not",
                         "label every image, or none (agreement is used without labels)")
    return labelled


def _decode(batch: Sequence[Any], start: int, ok_labels: list[int],
            skipped: list[dict[str, Any]]) -> list[tuple[int, np.ndarray]]:
    """(index, uint8 RGB) of the batch's readable images; the others go to ``skipped``."""
    decoded = []
    for j, s in enumerate(batch):
        try:
            decoded.append((start + j, np.asarray(load_image(s.path), np.uint8)))
            ok_labels.append(s.label)
        except AffeqError as e:
            skipped.append({"index": start + j, "path": s.path, "reason": str(e)})
    return decoded


def _score_batch(decoded: Sequence[tuple[int, np.ndarray]], nets: Sequence[_Net],
                 rows: Sequence[_Row], cors: Sequence[Corruption], seed: int,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and confidences [R, C, b] of every row under every corruption."""
    keys = {preprocess_key(n.spec) for n in nets}
    p_b = np.zeros((len(rows), len(cors), len(decoded)), np.int32)
    c_b = np.zeros((len(rows), len(cors), len(decoded)), np.float64)
    for c, cor in enumerate(cors):
        imgs = [Image.fromarray(cor(arr, np.random.default_rng([seed, idx, c])))
                for idx, arr in decoded]
        x = {key: np.stack([preprocess(im, key) for im in imgs]) for key in keys}
        feats = [np.asarray(n.session.run(x[preprocess_key(n.spec)], batch_size), np.float64)
                 for n in nets]
        for r, (_, i, w, b) in enumerate(rows):
            p = softmax(feats[i] @ w.T + b)
            p_b[r, c] = np.argmax(p, axis=1)
            c_b[r, c] = p.max(axis=1)
    return p_b, c_b


def _score_all(src: DataSource, nets: Sequence[_Net], rows: Sequence[_Row],
               cors: Sequence[Corruption], seed: int, batch_size: int, prog: Progress
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Predictions and confidences [R, C, n] over the readable images, their labels, and the
    skipped images."""
    pred: list[np.ndarray] = []  # per batch [R, C, b]
    conf: list[np.ndarray] = []
    ok_labels: list[int] = []
    skipped: list[dict[str, Any]] = []
    prog.start("ablations", total=len(src.samples), unit="img")
    for start in range(0, len(src.samples), batch_size):
        batch = src.samples[start:start + batch_size]
        decoded = _decode(batch, start, ok_labels, skipped)
        if decoded:
            p_b, c_b = _score_batch(decoded, nets, rows, cors, seed, batch_size)
            pred.append(p_b)
            conf.append(c_b)
        prog.advance(len(batch))
    prog.done()
    if not pred:
        raise AffeqError(f"no readable image in {src.root}", "check --data")
    return (np.concatenate(pred, axis=2), np.concatenate(conf, axis=2),
            np.asarray(ok_labels, np.int64), skipped)


def ablate(models: Sequence[str | os.PathLike], data: str | os.PathLike | DataSource,
           maps: str | os.PathLike | MapSet | None = None, *, out: str | os.PathLike | None = None,
           options: AblateOptions | None = None, images: ImageOptions | None = None,
           progress: Progress | None = None) -> AblationTable:
    """Score ``models`` (registry names or export folders) and, with ``maps``, every hybrid
    between them, on ``data`` under each corruption (``options``). With ``out`` writes
    ``ablation.json``, ``ablation.md``, ``ablation.png`` and ``ablation.html``.

    ``images`` (default :data:`ABLATE_IMAGES`): its batch size, provider, export root, random
    weights and labels/meta files are used; each image is decoded in this process with the
    networks' exact transform (its ``workers`` and ``pipeline`` do not apply)."""
    opt, img = options or AblateOptions(), images or ABLATE_IMAGES
    if len(models) < 1:
        raise AffeqError("no models given", "pass --models A,B[,…]")
    check_image_options(img, max_images=opt.max_images)
    src = data if isinstance(data, DataSource) else load_data(data, img.labels, img.meta)
    src = src.head(opt.max_images)
    prog = or_silent(progress)
    prog.step("opening the networks")
    nets = _open_all(models, img)
    rows = _rows(nets, maps)
    cors = (list(opt.corruptions) if opt.corruptions is not None
            else default_corruptions(tuple(opt.amounts)))
    labelled = _labelled(src)
    pr, cf, y, skipped = _score_all(src, nets, rows, cors, opt.seed, img.batch_size, prog)
    if labelled:
        score = (pr == y[None, None, :]).mean(axis=2) * 100.0
    else:
        score = (pr == pr[:, :1, :]).mean(axis=2) * 100.0
    table = AblationTable([r[0] for r in rows], [c.name for c in cors], [c.family for c in cors],
                          "top-1" if labelled else "agreement", score, cf.mean(axis=2), pr,
                          int(pr.shape[2]), skipped)
    if out is not None:
        table.files = write_ablation(table, Path(out))
    return table


def write_ablation(table: AblationTable, out: Path) -> dict[str, Path]:
    """``ablation.json``, ``ablation.md``, ``ablation.png`` and ``ablation.html`` in ``out``."""
    ensure_writable_dir(out)
    png = ablation_png(table)
    files = {"json": out / "ablation.json", "md": out / "ablation.md",
             "png": out / "ablation.png", "html": out / "ablation.html"}
    write_json_atomic(files["json"], table.to_dict())
    write_bytes_atomic(files["md"], (table.markdown() + "\n").encode())
    write_bytes_atomic(files["png"], png)
    body = (f"<p>{table.n} images; {table.measure} in % (mean confidence in brackets); hybrids "
            "are A→B = B's classifier on A's mapped features.</p>" +
            ablation_html_table(table) + img_tag(png, "score against corruption strength"))
    write_bytes_atomic(files["html"], page("Robustness ablations", body).encode())
    return files


def ablation_html_table(table: AblationTable) -> str:
    """The table as HTML (drops from clean shaded red)."""
    import html

    out = ["<table><tr><th>network / hybrid</th>" +
           "".join(f"<th>{html.escape(c)}</th>" for c in table.corruptions) + "</tr>"]
    for r, name in enumerate(table.rows):
        cells = []
        for c in range(len(table.corruptions)):
            drop = max(0.0, float(table.score[r, 0] - table.score[r, c]))
            t = min(1.0, drop / 50.0) * 0.8
            g = int(255 * (1 - t))
            bg = f"#ff{g:02x}{g:02x}"
            cells.append(f"<td style='background:{bg}'>{table.score[r, c]:.1f} "
                         f"<small>({table.confidence[r, c]:.2f})</small></td>")
        out.append(f"<tr><th style='text-align:left'>{html.escape(name)}</th>{''.join(cells)}"
                   "</tr>")
    return "".join(out) + "</table>"
