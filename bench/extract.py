"""Benchmark: the feed (decode + resize + normalise) and extraction end to end, same-run ratios.

One run reports (issue 25):

1. loader only, one preprocessing (the first model's), in this process: images per CPU-second of
   our loader on each pipeline (``exact``, ``pillow``, ``torchvision``, and ``nvjpeg`` where it
   loads: a CUDA GPU) against a minimal Pillow loop (timm's eval transform written out) and a
   minimal torchvision loop;
2. worker scaling: our loader (default pipeline) with 0, 1, 2, … decode processes: images per
   second (wall) and per CPU-second (this process and its workers);
3. end to end: the decode-once extraction (what ``feature_batches`` does), for each pipeline of
   ``--pipeline`` (a comma list), against a minimal onnxruntime loop (Pillow + the same
   ``features.onnx`` sessions, one process) and torch eager (the same preprocessing, the
   timm/torchvision model's features in torch, no grad); ``--cli`` adds the whole
   ``affeq-rt extract`` command (a new process each time: start-up, export check, store writes).

    python bench/extract.py --models efficientnet_lite0,mobilenet_v2 --images 400 \
        --imagenet-like --workers-list 0,1,2 --repeats 2

Without ``--data`` it writes ``--images`` JPEGs made from scikit-image's sample photos into a
temporary folder (``--imagenet-like``: 500×375 / 375×500, ImageNet's common sizes). Every
contender runs interleaved with the others, best of ``--repeats``; prints a JSON record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from affeq_rt.data.gpu_decode import device_of_providers
from affeq_rt.data.loader import default_workers, iter_batches
from affeq_rt.data.preprocess import (
    DEFAULT_PIPELINE,
    load_image,
    preprocess,
    resolve_pipeline,
    torchvision_installed,
)
from affeq_rt.data.readers import discover
from affeq_rt.method.extract import open_networks, parse_models, run_network


def make_photos(folder: Path, count: int, seed: int = 0, imagenet_like: bool = False) -> None:
    """``count`` distinct JPEGs (random crops of scikit-image's sample photos, 400-640 px);
    ``imagenet_like``: 4:3 crops (a quarter of them portrait) resized to 500×375 / 375×500,
    ImageNet's most common sizes."""
    import skimage.data as d
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "camera", "coins", "moon", "brick", "grass", "clock"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = [np.asarray(getattr(d, n)()) for n in names]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        a = base[i % len(base)]
        h, w = a.shape[:2]
        if imagenet_like:
            land = rng.random() < 0.75
            ar = 4 / 3 if land else 3 / 4
            cw = int(min(w, h * ar) * rng.uniform(0.6, 1.0))
            ch = int(cw / ar)
        else:
            ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(a[y:y + ch, x:x + cw])
        if imagenet_like:
            im = im.resize((500, 375) if land else (375, 500), Image.Resampling.BICUBIC)
        im.save(folder / f"img_{i:05d}.jpg", quality=90)


def cpu_now() -> float:
    """CPU seconds of this process plus its finished children (decode workers)."""
    return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime \
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime


def measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU seconds of each function, interleaved (A B C A B C): a shared machine."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            time.sleep(0.2)
            t0, c0 = time.perf_counter(), cpu_now()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(cpu_now() - c0)
    return {k: {"wall_s": min(wall[k]), "cpu_s": min(cpu[k]),
                "wall_s_each": [round(w, 3) for w in wall[k]]} for k in fns}


def minimal_pillow(paths: list[str], p) -> None:
    """timm's eval transform written out: Pillow decode, resize, crop, float normalise."""
    from PIL import Image

    mean, std = np.asarray(p.mean, np.float32), np.asarray(p.std, np.float32)
    interp = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[
        p.interpolation]
    for f in paths:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = math.floor(p.input_size / p.crop_pct)
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        im = im.resize((nw, nh), interp)
        left, top = round((nw - p.input_size) / 2), round((nh - p.input_size) / 2)
        x = np.asarray(im.crop((left, top, left + p.input_size, top + p.input_size)), np.float32)
        ((x / 255.0 - mean) / std).transpose(2, 0, 1).copy()


def minimal_torchvision(paths: list[str], p) -> None:
    """torchvision's decode_jpeg + v2 resize + crop + float normalise, one image at a time."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as tvf

    mode = tvf.InterpolationMode.BICUBIC if p.interpolation == "bicubic" \
        else tvf.InterpolationMode.BILINEAR
    torch.set_num_threads(1)  # one image at a time: more threads only spin (CPU-seconds)
    mean = torch.tensor(p.mean).view(3, 1, 1)
    std = torch.tensor(p.std).view(3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in paths:
            t = decode_jpeg(read_file(f), mode=ImageReadMode.RGB)
            h, w = t.shape[1:]
            s = math.floor(p.input_size / p.crop_pct)
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            t = tvf.resize(t, [nh, nw], interpolation=mode, antialias=True)
            left, top = round((nw - p.input_size) / 2), round((nh - p.input_size) / 2)
            c = t[:, top:top + p.input_size, left:left + p.input_size]
            ((c.float() / 255.0 - mean) / std).numpy()


def minimal_ort(nets: list, paths: list[str], batch_size: int) -> None:
    """Pillow's exact preprocessing per distinct preprocessing, then the same ORT sessions."""
    keys = list(dict.fromkeys(n.key for n in nets))
    for b in range(0, len(paths), batch_size):
        imgs = [load_image(f) for f in paths[b:b + batch_size]]
        xs = {k: np.stack([preprocess(im, k) for im in imgs]) for k in keys}
        for n in nets:
            n.session.run(xs[n.key], batch_size=batch_size)


#: The minimal onnxruntime loop as a whole process (``--cli``'s baseline): imports, the same
#: ``features.onnx`` sessions opened with onnxruntime's defaults, the same exact preprocessing,
#: nothing written. argv: batch size, a file listing the images, the export folders.
MINIMAL_SCRIPT = """
import sys
import numpy as np
import onnxruntime as ort
from affeq_rt.data.preprocess import load_image, preprocess
from affeq_rt.onnx.exported import ExportedBackbone
bs, paths = int(sys.argv[1]), open(sys.argv[2]).read().splitlines()
exps = [ExportedBackbone(d) for d in sys.argv[3:]]
sess = [ort.InferenceSession(str(e.features_path), providers=["CPUExecutionProvider"])
        for e in exps]
pre = [e.spec.preprocessing for e in exps]
for b in range(0, len(paths), bs):
    imgs = [load_image(f) for f in paths[b:b + bs]]
    for s, p in zip(sess, pre):
        s.run(None, {s.get_inputs()[0].name: np.stack([preprocess(im, p) for im in imgs])})
"""


def torch_eager(models: list, nets: list, paths: list[str], batch_size: int) -> None:
    """The same preprocessing, each network's features module in torch eager (no grad)."""
    import torch

    keys = list(dict.fromkeys(n.key for n in nets))
    with torch.no_grad():
        for b in range(0, len(paths), batch_size):
            imgs = [load_image(f) for f in paths[b:b + batch_size]]
            xs = {k: torch.from_numpy(np.stack([preprocess(im, k) for im in imgs])) for k in keys}
            for m, n in zip(models, nets, strict=True):
                m(xs[n.key])


def torch_features(names: list[str], random_weights: bool) -> list:
    """Each network's feature extractor (the model without its linear head), eval mode."""
    from affeq_rt.model.build import build_model
    from affeq_rt.model.split import split_model
    from affeq_rt.registry.spec import get_spec

    return [split_model(build_model(get_spec(n), random_weights=random_weights))[0].eval()
            for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,mobilenet_v2")
    ap.add_argument("--data", default=None, help="image folder (default: generated photos)")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--imagenet-like", action="store_true", help="generate 500×375 JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers-list", default="0,1,2", help="worker counts to scale over")
    ap.add_argument("--workers", type=int, default=None,
                    help="end to end: decode processes (default: the loader's default)")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--no-torch-eager", action="store_true")
    ap.add_argument("--export-root", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", default="loader,workers,end-to-end")
    ap.add_argument("--pipeline", default="fast",
                    help="our pipelines end to end, a comma list (the first: worker scaling)")
    ap.add_argument("--cli", action="store_true",
                    help="end to end: also time the affeq-rt extract command (new process)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    pipelines = args.pipeline.split(",")
    args.pipeline = pipelines[0]

    names = parse_models(args.models)
    rec: dict = {"models": names, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                 "machine": platform.processor() or platform.machine(),
                 "load_before": os.getloadavg()[0], "default_pipeline": DEFAULT_PIPELINE,
                 "default_pipeline_here": resolve_pipeline(DEFAULT_PIPELINE),
                 "default_workers_here": default_workers(), "pipelines": pipelines,
                 "pipelines_here": [resolve_pipeline(p) for p in pipelines]}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "photos"
        if not args.data:
            make_photos(data, args.images, imagenet_like=args.imagenet_like)
        samples = discover(data).head(args.images).samples
        paths = [s.path for s in samples]
        n = len(samples)
        rec["images"] = n
        nets = open_networks(names, provider=args.provider, export_root=args.export_root,
                             random_weights=args.random_weights)
        spec = nets[0].spec
        bs = args.batch_size

        def ours(pipeline: str, workers: int | None, specs: list) -> Callable[[], None]:
            def run() -> None:
                for _ in iter_batches(samples, specs, batch_size=bs, workers=workers,
                                      pipeline=pipeline):
                    pass
            return run

        if "loader" in parts:
            fns = {"minimal_pillow": lambda: minimal_pillow(paths, spec.preprocessing),
                   "ours_exact": ours("exact", 0, [spec]),
                   "ours_pillow": ours("pillow", 0, [spec])}
            try:
                import torchvision  # noqa: F401

                fns["minimal_torchvision"] = lambda: minimal_torchvision(paths,
                                                                         spec.preprocessing)
                fns["ours_torchvision"] = ours("torchvision", 0, [spec])
                fns["minimal_torchvision"]()  # warm: torch's import is not a per-image cost
            except ImportError:
                pass
            from affeq_rt.data.gpu_decode import nvjpeg_status

            ok, why = nvjpeg_status() if torchvision_installed() else (False, "no torchvision")
            rec["nvjpeg_here"] = "available" if ok else f"not available: {why}"
            if ok:  # the GPU decode (issue 25 item 3), in this process like the others
                fns["ours_nvjpeg"] = ours("nvjpeg", 0, [spec])
            res = measure(fns, args.repeats)
            base = n / res["minimal_pillow"]["cpu_s"]
            rec["loader_one_preprocessing_in_process"] = {
                k: {"img_per_cpu_s": round(n / v["cpu_s"], 1),
                    "vs_minimal_pillow": round(n / v["cpu_s"] / base, 2)} for k, v in res.items()}
            print(json.dumps(rec["loader_one_preprocessing_in_process"]), flush=True)
        if "workers" in parts:
            counts = [int(w) for w in args.workers_list.split(",")]
            specs = [n_.spec for n_ in nets]
            first: dict[str, list[float]] = {f"workers_{w}": [] for w in counts}

            def scaled(w: int) -> Callable[[], None]:
                def run() -> None:
                    t0 = time.perf_counter()
                    for i, _ in enumerate(iter_batches(samples, specs, batch_size=bs, workers=w,
                                                       pipeline=args.pipeline)):
                        if i == 0:  # the pool's start (spawn, imports) and the first batch
                            first[f"workers_{w}"].append(time.perf_counter() - t0)
                return run

            res = measure({f"workers_{w}": scaled(w) for w in counts}, args.repeats)
            w0 = n / res[f"workers_{counts[0]}"]["wall_s"]
            rec["worker_scaling_all_preprocessings"] = {
                k: {"img_per_s": round(n / v["wall_s"], 1),
                    "img_per_cpu_s": round(n / v["cpu_s"], 1),
                    f"vs_{counts[0]}_workers": round(n / v["wall_s"] / w0, 2),
                    "first_batch_s": round(min(first[k]), 2),
                    "img_per_s_after_first_batch": round(
                        (n - bs) / max(v["wall_s"] - min(first[k]), 1e-9), 1)}
                for k, v in res.items()}
            print(json.dumps(rec["worker_scaling_all_preprocessings"]), flush=True)
        if "end-to-end" in parts:
            workers = args.workers if args.workers is not None else default_workers()

            device = device_of_providers([n_.session.provider for n_ in nets])
            rec["end_to_end_pipelines_here"] = [resolve_pipeline(p, device) for p in pipelines]

            def extract_run(pipeline: str) -> Callable[[], None]:
                def run() -> None:  # feature_batches' two lines, with this pipeline
                    for batch in iter_batches(samples, [n_.spec for n_ in nets], batch_size=bs,
                                              workers=workers, pipeline=pipeline,
                                              device=device):
                        for n_ in nets:
                            run_network(n_, batch.tensors[n_.key], bs)
                return run

            def cli_run(pipeline: str) -> Callable[[], None]:
                runs = iter(range(10**6))

                def run() -> None:  # the whole command, a new store each time
                    cmd = [sys.executable, "-m", "affeq_rt", "extract", "--models",
                           ",".join(names), "--data", str(data), "--out",
                           str(Path(tmp) / f"store_{pipeline}_{next(runs)}"), "--batch-size",
                           str(bs), "--workers", str(workers), "--preprocessing", pipeline,
                           "--provider", args.provider, "--max-images", str(n)]
                    if args.random_weights:
                        cmd.append("--random-weights")
                    if args.export_root:
                        cmd += ["--export-root", args.export_root]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                return run

            fns = {f"affeq_extract_{p}": extract_run(p) for p in pipelines}
            if args.cli:
                fns.update({f"affeq_cli_{p}": cli_run(p) for p in pipelines})
            fns["minimal_ort"] = lambda: minimal_ort(nets, paths, bs)
            if args.cli:  # the command's fair baseline: the minimal loop as a whole process
                (Path(tmp) / "minimal.py").write_text(MINIMAL_SCRIPT)
                (Path(tmp) / "paths.txt").write_text("\n".join(str(p) for p in paths))
                script = [sys.executable, str(Path(tmp) / "minimal.py"), str(bs),
                          str(Path(tmp) / "paths.txt"), *(str(n_.export_dir) for n_ in nets)]
                fns["minimal_ort_script"] = lambda: subprocess.run(script, check=True)
            if not args.no_torch_eager:
                tmods = torch_features(names, args.random_weights)
                fns["torch_eager"] = lambda: torch_eager(tmods, nets, paths, bs)
            for p in pipelines:  # warm the sessions (and torch's import on the torchvision route)
                extract_run(p)()
            res = measure(fns, args.repeats)
            rec["end_to_end"] = {
                k: {"img_per_s": round(n / v["wall_s"], 2), "img_per_cpu_s":
                    round(n / v["cpu_s"], 2),
                    "wall_vs_minimal_ort": round(v["wall_s"] / res["minimal_ort"]["wall_s"], 3),
                    "wall_s_each": v["wall_s_each"],
                    **({"speed_vs_torch_eager": round(res["torch_eager"]["wall_s"] / v["wall_s"],
                                                      2)} if "torch_eager" in res else {})}
                for k, v in res.items()}
            if "minimal_ort_script" in res:  # whole command against whole minimal process
                rec["cli_vs_minimal_script"] = {
                    k: round(v["wall_s"] / res["minimal_ort_script"]["wall_s"], 3)
                    for k, v in res.items() if k.startswith("affeq_cli_")}
            print(json.dumps(rec["end_to_end"]), flush=True)
    rec["load_after"] = os.getloadavg()[0]
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
