"""GPU benchmarks (issue 15): each figure against its baseline in the same run, JSON records out.

Parts (``--only gram,evaluate,extract,decode``; scripts/gpu-check.sh runs each as its own step):

* ``gram``: ``GramAccumulator`` on cuda (float64 blocks, cuBLAS dgemm) vs cupy/cuBLAS ``X.T @ X`` in
  TF32 and FP64 (FP64 includes the float32→float64 copy), and the accuracy of each against the
  float64 two-pass reference ``gram_reference`` (max |Δ|/√(GᵢᵢGⱼⱼ)).
* ``evaluate``: the 10-source table, 50,000 rows, 10 heads per source (9 targets + the source's
  own), 1000 classes: ``evaluate_heads`` on cuda vs cupy matmul + argmax + top-5 per head.
* ``extract``: one registry network with random weights: torch CUDA eager fp16 (the baseline a
  researcher uses), then onnxruntime's CUDA and TensorRT providers where this onnxruntime has
  them ("absent" otherwise, not a failure).
* ``decode``: the feed (issue 25 item 3): the loader's ``nvjpeg`` pipeline (nvJPEG decode + the
  exact resize on the GPU) against CPU decode on the same JPEGs, in this process: ``exact`` and
  ``fast``'s CPU path, images per second and per CPU-second; agreement with ``exact`` (pixels,
  then a random-weight network's features and top-1). "not available" with the reason where
  nvjpeg does not load (no CUDA torch, no torchvision, a torchvision without nvJPEG). The dry run
  runs the same code with nvjpeg's decode on the CPU (libjpeg-turbo: agreement must be exact).

Records: ``{name, value, unit, baseline, ratio = value / baseline, notes}``, written after every
record (a step killed by its timeout keeps what it measured). Times are the median of
``--repeats`` after ``--warmup`` calls, cupy events around a synchronised device. ``--dry-run``
runs the same code on the CPU with NumPy stand-ins and tiny sizes (checks the logic, not speed).

    python bench/gpu.py --out gpu.json                    # all parts, on a GPU machine
    python bench/gpu.py --dry-run --out gpu.json          # logic check on any machine
    python bench/gpu.py --markdown OUT/results.json       # the docs/BENCHMARKS.md GPU section
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_results import record, validate_records  # noqa: E402

# Feature widths of the thesis ten (Table 5.1 stand-ins): the evaluation table's sources.
THESIS_DIMS = (1024, 2048, 2048, 1536, 1536, 2048, 2048, 1792, 4032, 4320)


class Ctx:
    """Where a run happens: array module, device name for the core, timing, sizes."""

    def __init__(self, dry_run: bool, warmup: int, repeats: int) -> None:
        self.dry = dry_run
        self.warmup, self.repeats = warmup, repeats
        self.xp: Any = np
        self.device = "cpu" if dry_run else "cuda"
        self.xp_error = ""
        if not dry_run:
            try:
                import cupy

                self.xp = cupy
            except Exception as e:  # noqa: BLE001 - torch-only parts still run without cupy
                self.xp, self.xp_error = None, f"cupy does not import: {e}"

    def need_xp(self) -> Any:
        """The array module, or a RuntimeError saying why cupy is missing."""
        if self.xp is None:
            raise RuntimeError(self.xp_error)
        return self.xp

    def sync(self) -> None:
        """Wait for the device (no-op on the CPU)."""
        if self.xp is not None and self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()
            self.xp.cuda.Device().synchronize()

    def time_ms(self, fn: Callable[[], object], sync: Callable[[], None] | None = None
                ) -> tuple[float, list[float]]:
        """Median milliseconds of ``fn`` over the repeats (after warm-ups), and every repeat.

        On a GPU: cupy events on the current stream around the call, device synchronised before
        and the end event waited for (host-side work inside ``fn`` is included)."""
        sync = sync or self.sync
        for _ in range(self.warmup):
            fn()
        sync()
        runs = []
        for _ in range(self.repeats):
            if self.xp is None or self.xp is np:  # dry run, or torch-only parts without cupy
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                runs.append((time.perf_counter() - t0) * 1e3)
                continue
            cp = self.xp
            start, end = cp.cuda.Event(), cp.cuda.Event()
            sync()
            start.record()
            fn()
            sync()
            end.record()
            end.synchronize()
            runs.append(float(cp.cuda.get_elapsed_time(start, end)))
        return statistics.median(runs), runs


class Sink:
    """Collects records and rewrites the output file after each one."""

    def __init__(self, out: Path | None, meta: dict[str, Any]) -> None:
        self.out, self.meta, self.records = out, meta, []  # type: list[dict[str, Any]]
        self.failed = False

    def add(self, rec: dict[str, Any]) -> None:
        """Keep a record, print it, flush the file."""
        self.records.append(rec)
        print(json.dumps(rec), flush=True)
        self.write()

    def error(self, name: str, exc: BaseException) -> None:
        """A part that raised: recorded as unit "error" with the exception, the run continues."""
        self.failed = True
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.add(record(name, None, "error", notes=msg[:300]))

    def write(self) -> None:
        """Write ``{meta..., records}`` atomically (temp file + rename)."""
        if self.out is None:
            return
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.meta, "records": self.records}, indent=1) + "\n")
        tmp.replace(self.out)


# ---- gram --------------------------------------------------------------------------------------
def corr_err(G: np.ndarray, R: np.ndarray) -> float:
    """max |G − R| / √(RᵢᵢRⱼⱼ) over the upper triangle (the accumulator's error measure)."""
    d = np.sqrt(np.clip(np.diag(R), 1e-300, None))
    E = np.triu(np.abs(G - R)) / np.outer(d, d)
    return float(E.max())


@contextlib.contextmanager
def cupy_tf32(xp: Any) -> Iterator[str]:
    """cupy float32 matmuls in TF32 inside the block (restored after); yields how."""
    if xp is np:
        yield "numpy float32 (dry run: no TF32)"
        return
    from cupy._core import _routines_linalg as lin

    old = lin.get_compute_type(xp.float32)
    lin.set_compute_type(xp.float32, lin.COMPUTE_TYPE_TF32)
    try:
        yield "cupy COMPUTE_TYPE_TF32"
    finally:
        lin.set_compute_type(xp.float32, old)


def bench_gram(ctx: Ctx, sink: Sink, rows: int, dims: list[int]) -> None:
    """GramAccumulator vs X.T @ X (TF32, FP64) for each width; accuracy vs float64 reference.

    Baselines and the accumulator are measured in separate tries: one failing still leaves the
    other's numbers (records then carry None where a figure is missing)."""
    from affeq_rt.core import GramAccumulator, gram_reference

    for d in dims:
        tag = f"gram n={rows} d={d}"
        try:
            xp = ctx.need_xp()
            rng = np.random.default_rng(d)
            # ReLU-like features with per-column offsets and scales (as real features are).
            scale = np.logspace(-1, 1, d).astype(np.float32)
            Xh = np.abs(rng.standard_normal((rows, d), dtype=np.float32)) * scale + 0.5 * scale
            X = xp.asarray(Xh)
            ref = gram_reference(Xh)
            R_scatter, R_gram = ref.scatter, ref.gram()[:d, :d]  # gram() is of [X 1]
        except Exception as e:  # noqa: BLE001 - record and go on to the next width
            sink.error(f"{tag}: setup", e)
            continue
        t64 = t32 = e64 = e32 = t_acc = e_acc = None
        how = "?"
        try:
            def fp64(X: Any = X, xp: Any = xp) -> Any:
                Y = X.astype(xp.float64)
                return Y.T @ Y

            def tf32(X: Any = X, xp: Any = xp) -> Any:
                with cupy_tf32(xp):
                    return X.T @ X

            t64, _ = ctx.time_ms(fp64)
            t32, _ = ctx.time_ms(tf32)
            with cupy_tf32(xp) as how:
                G32 = X.T @ X
            e64 = corr_err(_host(xp, fp64()), R_gram)
            e32 = corr_err(_host(xp, G32).astype(np.float64), R_gram)
        except Exception as e:  # noqa: BLE001
            sink.error(f"{tag}: cuBLAS baselines", e)
        try:
            acc_box: list[Any] = []

            def affeq(X: Any = X, d: int = d, box: list[Any] = acc_box) -> None:
                g = GramAccumulator(d, device=ctx.device)
                g.update(X)
                g.flush()
                box[:] = [g]

            t_acc, _ = ctx.time_ms(affeq)
            e_acc = corr_err(acc_box[0].scatter(), R_scatter)
        except Exception as e:  # noqa: BLE001
            sink.error(f"{tag}: affeq GramAccumulator({ctx.device})", e)
        tflops = f"{rows * d * (d + 1) / t_acc / 1e9:.1f}" if t_acc else "-"
        sink.add(record(f"{tag}: affeq vs cuBLAS FP64 X.T@X", t_acc, "ms", t64,
                        f"target ratio <= 1.25 (>= 80 % of cuBLAS); affeq {tflops} useful "
                        f"TFLOP/s; FP64 baseline = astype(float64) + gemm"))
        sink.add(record(f"{tag}: affeq vs cuBLAS TF32 X.T@X", t_acc, "ms", t32, f"baseline {how}"))
        sink.add(record(f"{tag}: accuracy affeq scatter", e_acc, "max rel err", e64,
                        "vs float64 two-pass reference; baseline = cuBLAS FP64 raw Gram's error"))
        sink.add(record(f"{tag}: accuracy cuBLAS TF32 Gram", e32, "max rel err", e64,
                        "raw X.T@X vs the reference's raw Gram; baseline = FP64's error"))


def _host(xp: Any, a: Any) -> np.ndarray:
    return a if xp is np else xp.asnumpy(a)


# ---- evaluate ----------------------------------------------------------------------------------
def bench_evaluate(ctx: Ctx, sink: Sink, rows: int, dims: list[int], heads: int,
                   classes: int) -> None:
    """The whole N-source table through evaluate_heads vs cupy matmul + argmax + top-5."""
    from affeq_rt.core import evaluate_heads

    tag = f"evaluate {len(dims)} sources x {heads} heads x {rows} rows, K={classes}"
    try:
        xp = ctx.need_xp()
        rng = np.random.default_rng(1)
        labels_h = rng.integers(0, classes, rows).astype(np.int64)
        labels = xp.asarray(labels_h)
        Xs, Wh, bh, Wd, bd = [], [], [], [], []
        for d in dims:
            if xp is np:
                Xs.append(np.abs(rng.standard_normal((rows, d), dtype=np.float32)))
            else:  # 4.5 GB of features: drawn on the device, not the host
                Xs.append(xp.abs(xp.random.standard_normal((rows, d), dtype=xp.float32)))
            W = rng.standard_normal((heads, classes, d), dtype=np.float32) / np.float32(np.sqrt(d))
            b = rng.standard_normal((heads, classes), dtype=np.float32) * np.float32(0.1)
            Wh.append(W), bh.append(b), Wd.append(xp.asarray(W)), bd.append(xp.asarray(b))
    except Exception as e:  # noqa: BLE001
        sink.error(f"{tag}: setup", e)
        return
    t_aff = t_base = None
    results: list[Any] = []
    base_pred: list[Any] = []
    try:
        def baseline() -> None:
            base_pred.clear()
            for X, W, b in zip(Xs, Wd, bd, strict=True):
                for t in range(heads):
                    logits = X @ W[t].T + b[t]
                    pred = logits.argmax(axis=1)
                    top5 = xp.argpartition(logits, -5, axis=1)[:, -5:]
                    hits1 = (pred == labels).sum()  # stays on the device: no sync per head
                    hits5 = (top5 == labels[:, None]).any(axis=1).sum()
                    base_pred.append((pred, hits1, hits5))

        t_base, _ = ctx.time_ms(baseline)
    except Exception as e:  # noqa: BLE001
        sink.error(f"{tag}: cupy baseline", e)
    try:
        def affeq() -> None:
            results[:] = [evaluate_heads(X, W, b, labels_h, device=ctx.device)
                          for X, W, b in zip(Xs, Wh, bh, strict=True)]

        t_aff, _ = ctx.time_ms(affeq)
    except Exception as e:  # noqa: BLE001
        sink.error(f"{tag}: affeq evaluate_heads({ctx.device})", e)
    agree = "-"
    if results and base_pred:
        ours = [r.pred[t] for r in results for t in range(heads)]
        same = [np.mean(_host(xp, p) == q) for (p, _, _), q in zip(base_pred, ours, strict=True)]
        agree = f"{np.mean(same):.5f}"
    sink.add(record(tag, t_aff and t_aff / 1e3, "s", t_base and t_base / 1e3,
                    f"target < 1 s for the whole table; argmax agreement with baseline {agree}; "
                    f"affeq takes host heads (copied per call), baseline's are already on the "
                    f"device"))


# ---- extract -----------------------------------------------------------------------------------
def bench_extract(ctx: Ctx, sink: Sink, model: str, batch: int, size: int | None) -> None:
    """Feature extraction: torch eager fp16 on CUDA (baseline), then ORT CUDA / TensorRT."""
    tag = f"extract {model}"
    try:
        import torch

        from affeq_rt.model.build import build_model
        from affeq_rt.model.split import split_model
        from affeq_rt.registry.spec import get_spec

        spec = get_spec(model)
        S = size or spec.input_size
        features, _ = split_model(build_model(spec, random_weights=True))
        dev, dtype = ("cpu", torch.float32) if ctx.dry else ("cuda", torch.float16)
        features = features.to(dev, dtype).eval()
        x = torch.randn(batch, 3, S, S, device=dev, dtype=dtype)

        def run_torch() -> None:
            with torch.inference_mode():
                features(x)

        def sync() -> None:
            if not ctx.dry:
                torch.cuda.synchronize()

        ms, _ = ctx.time_ms(run_torch, sync)
        torch_ips = batch / (ms / 1e3)
        how = "torch CPU float32 (dry run)" if ctx.dry else "torch CUDA eager fp16"
        sink.add(record(f"{tag} batch={batch} {S}px: {how}", torch_ips, "img/s", None,
                        "the baseline (random weights)"))
    except Exception as e:  # noqa: BLE001
        sink.error(f"{tag}: torch", e)
        torch_ips, S = None, size or 224
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001
        providers = []
        ort_error = f"onnxruntime does not import: {e}"
    else:
        ort_error = ""
    export_dir: Path | None = None
    for short, prov in (("cuda", "CUDAExecutionProvider"),
                        ("tensorrt", "TensorrtExecutionProvider")):
        name = f"{tag} batch={batch} {S}px: onnxruntime {prov} fp16"
        if prov not in providers:
            sink.add(record(name, None, "img/s", torch_ips,
                            f"absent: {ort_error or 'this onnxruntime offers ' + str(providers)}"))
            continue
        if ctx.dry:
            sink.add(record(name, None, "img/s", torch_ips, "present; not run (dry run)"))
            continue
        try:
            from affeq_rt.onnx.export import export_backbone
            from affeq_rt.onnx.runtime import create_session

            if export_dir is None:
                export_dir = export_backbone(model, out=Path(tempfile.mkdtemp()),
                                             random_weights=True).path
            sess = create_session(export_dir / "features.onnx", provider=short, fp16=True)
            xin = np.random.default_rng(0).standard_normal((batch, 3, S, S), dtype=np.float32)
            ms, _ = ctx.time_ms(lambda s=sess, x=xin: s.run(x, batch_size=batch))
            sink.add(record(name, batch / (ms / 1e3), "img/s", torch_ips,
                            f"provider {sess.provider}; host float32 in/out included"))
        except Exception as e:  # noqa: BLE001
            sink.error(name, e)


# ---- decode ------------------------------------------------------------------------------------
def decode_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (quality 90, 4:2:0), ImageNet's common sizes (500×375, a
    quarter 375×500): smooth random fields (upsampled noise) with hard-edged shapes. Needs only
    NumPy and Pillow (the GPU machine has no scikit-image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = (375, 500) if i % 4 == 3 else (500, 375)
        low = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 160)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=fill)
        p = folder / f"img{i:05d}.jpg"
        im.save(p, quality=90)
        out.append(p)
    return out


@contextlib.contextmanager
def nvjpeg_on_cpu() -> Iterator[None]:
    """The dry run's stand-in: ``nvjpeg`` available, its decode by torchvision on the CPU
    (without torchvision: nothing changed, nvjpeg is "not available")."""
    from affeq_rt.data import gpu_decode as gd
    from affeq_rt.data.preprocess import torchvision_installed

    if not torchvision_installed():
        yield
        return

    real_status, real_decode = gd.nvjpeg_status, gd.decode_crops
    gd.nvjpeg_status = lambda _device="cuda": (True, "")  # type: ignore[assignment]
    gd.decode_crops = lambda paths, keys, _device="cuda": real_decode(paths, keys, "cpu")  # type: ignore[assignment]
    try:
        yield
    finally:
        gd.nvjpeg_status, gd.decode_crops = real_status, real_decode


def _levels(x: np.ndarray, key: Any) -> np.ndarray:
    """Normalised float32 [N, 3, S, S] back to 0..255 levels (rounded)."""
    m = np.asarray(key.mean, np.float64)[None, :, None, None]
    s = np.asarray(key.std, np.float64)[None, :, None, None]
    return np.rint((x.astype(np.float64) * s + m) * 255.0)


def bench_decode(ctx: Ctx, sink: Sink, count: int, batch: int, model: str | None) -> None:
    """nvjpeg vs CPU decode (exact, fast) through the loader on the same files; agreement."""
    from affeq_rt.data.loader import iter_batches
    from affeq_rt.data.preprocess import resolve_pipeline
    from affeq_rt.data.readers import discover
    from affeq_rt.registry.spec import Preprocessing

    key = Preprocessing(224, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tag = f"decode {count} JPEGs 500x375 -> 224 bicubic, batch {batch}, in-process"
    try:
        folder = Path(tempfile.mkdtemp(prefix="affeq-decode-"))
        decode_photos(folder, count)
        samples = discover(folder).samples
        cpu_fast = resolve_pipeline("fast")  # the CPU's fast path (no device given)
    except Exception as e:  # noqa: BLE001
        sink.error(f"{tag}: setup", e)
        return
    stand_in = contextlib.nullcontext() if not ctx.dry else nvjpeg_on_cpu()
    with stand_in:
        from affeq_rt.data import gpu_decode as gd

        ok, why = gd.nvjpeg_status("cuda")
        device = "cuda"
        how = "nvJPEG (torchvision) + exact resize on cuda" if not ctx.dry else \
            "DRY RUN: nvjpeg's code with torchvision's CPU decode"

        def load(pipeline: str) -> tuple[list[Any], float, float]:
            """(tensors per batch, wall s, process CPU s) of one pass of the loader."""
            w0, c0 = time.perf_counter(), time.process_time()
            out = [b.tensors[key] for b in iter_batches(samples, [key], batch_size=batch,
                                                         workers=0, pipeline=pipeline,
                                                         device=device)]
            return out, time.perf_counter() - w0, time.process_time() - c0

        runs: dict[str, list[tuple[float, float]]] = {}
        tensors: dict[str, list[Any]] = {}
        names = ["exact", cpu_fast] + (["nvjpeg"] if ok else [])
        try:
            for p in names:
                load(p)  # warm-up: imports, CUDA context, taps cache
            for _ in range(min(ctx.repeats, 3)):  # whole passes over the files: 3 suffice
                for p in names:  # interleaved, so load changes hit every contender alike
                    t, wall, cpu = load(p)
                    tensors[p] = t
                    runs.setdefault(p, []).append((wall, cpu))
        except Exception as e:  # noqa: BLE001
            sink.error(f"{tag}: loader", e)
            return
        ips = {p: count / min(w for w, _ in r) for p, r in runs.items()}
        ipc = {p: count / max(min(c for _, c in r), 1e-9) for p, r in runs.items()}
        if not ok:
            for base in ("exact", cpu_fast):
                sink.add(record(f"{tag}: nvjpeg vs {base} (CPU)", None, "img/s", ips[base],
                                f"not available: {why}"))
            sink.add(record(f"{tag}: {cpu_fast} (CPU) vs exact (CPU)", ips[cpu_fast], "img/s",
                            ips["exact"], "CPU decode only"))
            return
        for base in ("exact", cpu_fast):
            sink.add(record(f"{tag}: nvjpeg vs {base} (CPU)", ips["nvjpeg"], "img/s", ips[base],
                            f"{how}; wall, best of {min(ctx.repeats, 3)}; {base} = "
                            f"Pillow/libjpeg-turbo decode + resize on one CPU thread; host "
                            f"float32 batches both"))
            sink.add(record(f"{tag}: nvjpeg vs {base} (CPU), per CPU-second", ipc["nvjpeg"],
                            "img/CPU-s", ipc[base], "this process's CPU time (the CPU left for "
                            "the networks)"))
        diff = {p: np.concatenate([np.abs(_levels(a, key) - _levels(b, key)).ravel() for a, b in
                                   zip(tensors[p], tensors["exact"], strict=True)])
                for p in ("nvjpeg", cpu_fast)}
        sink.add(record(f"{tag}: pixels differing from exact, nvjpeg vs {cpu_fast}",
                        float((diff["nvjpeg"] > 0).mean()), "fraction",
                        float((diff[cpu_fast] > 0).mean()),
                        f"max level diff nvjpeg {diff['nvjpeg'].max():.0f}, {cpu_fast} "
                        f"{diff[cpu_fast].max():.0f}; mean |diff| nvjpeg "
                        f"{diff['nvjpeg'].mean():.3f}"))
        if model:
            _decode_features(ctx, sink, tag, model, {p: tensors[p] for p in ("exact", "nvjpeg",
                                                                             cpu_fast)}, batch)


def _decode_features(ctx: Ctx, sink: Sink, tag: str, model: str, tensors: dict[str, list[Any]],
                     batch: int) -> None:
    """Features and top-1 of ``model`` (random weights: the GPU machine is offline) on each
    pipeline's tensors, against exact's: max |Δfeature| / max |feature|, argmax agreement."""
    if ctx.dry:
        sink.add(record(f"{tag}: {model} features, nvjpeg vs exact", None, "max rel diff",
                        None, "not run (dry run: the export takes minutes on a CPU)"))
        return
    try:
        from affeq_rt.method.images import open_networks, run_network

        net = open_networks([model], provider="auto", export_root=tempfile.mkdtemp(),
                            random_weights=True)[0]
        cpu_fast = next(p for p in tensors if p not in ("exact", "nvjpeg"))
        feats = {p: np.concatenate([run_network(net, x, batch) for x in xs])
                 for p, xs in tensors.items()}
        top1 = {p: (f @ net.head.weight.T + net.head.bias).argmax(axis=1)
                for p, f in feats.items()}
        scale = float(np.abs(feats["exact"]).max())
        rel = {p: float(np.abs(feats[p] - feats["exact"]).max()) / scale
               for p in ("nvjpeg", cpu_fast)}
        agree = {p: float((top1[p] == top1["exact"]).mean()) for p in ("nvjpeg", cpu_fast)}
        note = (f"random weights, provider {net.session.provider}; baseline = {cpu_fast} (CPU) "
                f"vs exact")
        sink.add(record(f"{tag}: {model} max feature diff vs exact, nvjpeg vs {cpu_fast}",
                        rel["nvjpeg"], "max rel diff", rel[cpu_fast], note))
        sink.add(record(f"{tag}: {model} top-1 agreement with exact, nvjpeg vs {cpu_fast}",
                        agree["nvjpeg"], "fraction", agree[cpu_fast], note))
    except Exception as e:  # noqa: BLE001
        sink.error(f"{tag}: {model} features", e)


# ---- markdown ----------------------------------------------------------------------------------
def markdown(doc: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md GPU section's measured part, from a gpu-check results.json."""
    m = doc.get("machine", {})
    dry = " (DRY RUN: not a measurement)" if doc.get("dry_run") else ""
    out = [f"Run: {doc.get('finished', '?')}, `{(doc.get('git') or {}).get('commit', '?')}`; "
           f"GPU: {m.get('gpu') or 'none'}; Python {m.get('python', '?')}; "
           f"CUDA backend: {doc['cuda']['reason']}{dry}.",
           "", "| figure | value | baseline | ratio | unit | notes |", "|---|---|---|---|---|---|"]

    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:.4g}"

    for r in doc["records"]:
        out.append(f"| {r['name']} | {f(r['value'])} | {f(r['baseline'])} | {f(r['ratio'])} | "
                   f"{r['unit']} | {r['notes']} |")
    steps = ", ".join(f"{s['name']} {s['rc']}" for s in doc["steps"])
    out += ["", f"Step exit statuses: {steps}."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; exit 1 if any part raised (its record says why)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, NumPy stand-ins, tiny sizes")
    ap.add_argument("--only", default="gram,evaluate,extract,decode", help="comma list of parts")
    ap.add_argument("--out", type=Path, help="records JSON (rewritten after every record)")
    ap.add_argument("--markdown", type=Path, metavar="RESULTS",
                    help="print the BENCHMARKS.md GPU table from gpu-check's results.json")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--model", default="resnet50", help="registry network for extraction")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--decode-images", type=int, default=None, help="JPEGs for the decode part")
    ap.add_argument("--decode-model", default="mobilenet_v2",
                    help="registry network (random weights) for the decode part's agreement; "
                         "'' skips it")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(a.markdown.read_text())))
        return 0
    parts = [p for p in a.only.split(",") if p]
    unknown = set(parts) - {"gram", "evaluate", "extract", "decode"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    dry = a.dry_run
    ctx = Ctx(dry, a.warmup if a.warmup is not None else (1 if dry else 2),
              a.repeats if a.repeats is not None else (2 if dry else 7))
    sink = Sink(a.out, {"dry_run": dry, "parts": parts, "device": ctx.device})
    sink.write()
    if "gram" in parts:
        bench_gram(ctx, sink, 512 if dry else 65536, [16] if dry else [2048, 4320])
    if "evaluate" in parts:
        bench_evaluate(ctx, sink, 200 if dry else 50000, [8, 12, 16] if dry else list(THESIS_DIMS),
                       3 if dry else 10, 20 if dry else 1000)
    if "extract" in parts:
        bench_extract(ctx, sink, a.model, a.batch or (2 if dry else 64), 64 if dry else None)
    if "decode" in parts:
        bench_decode(ctx, sink, a.decode_images or (12 if dry else 256), 4 if dry else 64,
                     a.decode_model or None)
    errs = validate_records(sink.records)
    for e in errs:
        print(f"schema: {e}", file=sys.stderr)
    return 1 if sink.failed or errs else 0


if __name__ == "__main__":
    sys.exit(main())
