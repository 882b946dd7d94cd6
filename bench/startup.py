"""Benchmark: whole-process start-up of ``affeq-rt predict`` on a cached export, against a minimal
onnxruntime script doing the same (Pillow preprocessing, the export's two graphs, argmax), and
``affeq-rt --help``, beside a bare ``python -c pass`` (the interpreter's own start-up); interleaved,
best of ``--repeats``, wall seconds and peak memory:

    python bench/startup.py --model efficientnet_lite0 --repeats 5
    python bench/startup.py --compare /tmp/old   # also an older source tree, in the same run

``--compare SRC`` times ``predict`` and ``--help`` of the affeq_rt package in SRC (e.g.
``git archive REV affeq_rt models pyproject.toml | tar -x -C SRC``, with the installed compiled
``_core*.so`` linked into SRC/affeq_rt) instead of the installed one. The export must be cached
(``affeq-rt export NAME`` first). Prints a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: ``python -c LAUNCH SRC ARGS…``: ``python -m affeq_rt ARGS…`` with the package taken from SRC
#: (the editable install's finder, which would always answer with the checkout, is dropped).
LAUNCH = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path "
          "if not type(f).__module__.startswith('_editable')]; "
          "sys.path.insert(0, sys.argv.pop(1)); "
          "runpy.run_module('affeq_rt', run_name='__main__', alter_sys=True)")

MINIMAL = '''
import sys, numpy as np, onnxruntime as ort
from PIL import Image
d, size, crop, interp = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
mean, std = np.array(eval(sys.argv[6]), np.float32), np.array(eval(sys.argv[7]), np.float32)
im = Image.open(sys.argv[1]).convert("RGB")
w, h = im.size
s = int(size / crop)
im = im.resize((s, int(s * h / w)) if w <= h else (int(s * w / h), s),
               Image.Resampling.BICUBIC if interp == "bicubic" else Image.Resampling.BILINEAR)
w, h = im.size
left, top = round((w - size) / 2), round((h - size) / 2)
x = (np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255 - mean) / std
x = x.transpose(2, 0, 1)[None].copy()
f = ort.InferenceSession(d + "/features.onnx", providers=["CPUExecutionProvider"])
c = ort.InferenceSession(d + "/classifier.onnx", providers=["CPUExecutionProvider"])
z = c.run(None, {c.get_inputs()[0].name: f.run(None, {f.get_inputs()[0].name: x})[0]})[0]
print(int(z.argmax()))
'''


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak resident MiB, CPU seconds: user + system) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` prints as Model name) and the logical CPU count."""
    names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return f"{names[0] if names else platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare", type=Path, default=None, metavar="SRC",
                    help="also time predict and --help of the affeq_rt source tree in SRC")
    args = ap.parse_args()

    from PIL import Image

    from affeq_rt.onnx.exported import ExportedBackbone, default_export_root

    exp = ExportedBackbone(default_export_root() / args.model)
    p = exp.spec.preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "one.jpg"
        import skimage.data

        Image.fromarray(skimage.data.chelsea()).save(img, quality=90)
        script = Path(tmp) / "minimal.py"
        script.write_text(MINIMAL)
        cmds = {
            "affeq_predict": [sys.executable, "-m", "affeq_rt", "predict", args.model, str(img)],
            "minimal_ort": [sys.executable, str(script), str(img), str(exp.path),
                            str(p.input_size), str(p.crop_pct), p.interpolation,
                            repr(list(p.mean)), repr(list(p.std))],
            "affeq_help": [sys.executable, "-m", "affeq_rt", "--help"],
            "python_bare": [sys.executable, "-c", "pass"],
        }
        if args.compare is not None:
            src = str(args.compare.resolve())
            cmds["compare_predict"] = [sys.executable, "-c", LAUNCH, src, "predict", args.model,
                                       str(img)]
            cmds["compare_help"] = [sys.executable, "-c", LAUNCH, src, "--help"]
        load_before = os.getloadavg()[0]
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cmds}
        for _ in range(args.repeats):
            for k, c in cmds.items():
                runs[k].append(run(c))
    # best wall and best CPU time (the least disturbed run of each), largest peak memory
    best = {k: (min(r[0] for r in v), max(r[1] for r in v), min(r[2] for r in v))
            for k, v in runs.items()}
    rec = {"model": args.model, "repeats": args.repeats,
           "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "machine": cpu_model(),
           **{k: {"wall_s": round(w, 3), "cpu_s": round(c, 3), "peak_mib": round(m)}
              for k, (w, m, c) in best.items()},
           "predict_vs_minimal_wall": round(best["affeq_predict"][0] / best["minimal_ort"][0], 2),
           "predict_vs_minimal_cpu": round(best["affeq_predict"][2] / best["minimal_ort"][2], 2),
           "predict_vs_minimal_memory": round(best["affeq_predict"][1] / best["minimal_ort"][1],
                                              2)}
    if args.compare is not None:
        rec["compare"] = str(args.compare)
        rec["compare_predict_vs_minimal_wall"] = round(
            best["compare_predict"][0] / best["minimal_ort"][0], 2)
        rec["compare_predict_vs_minimal_cpu"] = round(
            best["compare_predict"][2] / best["minimal_ort"][2], 2)
        rec["compare_help_vs_help_wall"] = round(
            best["compare_help"][0] / best["affeq_help"][0], 2)
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
