"""Results of scripts/gpu-check.sh: machine facts, backend probe, JSON schema, assembly, table.

Subcommands (the script calls them; stdlib only, so they run on any Python, venv or not)::

    python bench/gpu_results.py env --out OUT/env.json            # machine facts, never fails
    python bench/gpu_results.py backends --out OUT/backends.json  # exit 1 where CUDA is absent
    python bench/gpu_results.py assemble --out OUT                # OUT/results.json + table
    python bench/gpu_results.py validate OUT/results.json         # schema check only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "affeq-rt/gpu-check/1"
RECORD_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "value": (int, float, type(None)),
    "unit": (str,),
    "baseline": (int, float, type(None)),
    "ratio": (int, float, type(None)),
    "notes": (str,),
}
STEP_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "rc": (int,),
    "seconds": (int, float),
    "timed_out": (bool,),
    "log": (str,),
}
TOP_KEYS: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "dry_run": (bool,),
    "ok": (bool,),
    "started": (str,),
    "finished": (str,),
    "git": (dict,),
    "machine": (dict,),
    "options": (dict,),
    "cuda": (dict,),
    "steps": (list,),
    "records": (list,),
    "problems": (list,),
}
BENCH_PARTS = ("gram", "evaluate", "extract", "decode")


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record(name: str, value: float | None, unit: str, baseline: float | None = None,
           notes: str = "") -> dict[str, Any]:
    """One result record; ``ratio`` = value / baseline where both are finite numbers."""
    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(float(x)) else float(x)

    v, b = num(value), num(baseline)
    ratio = v / b if v is not None and b not in (None, 0.0) else None
    return {"name": name, "value": v, "unit": unit, "baseline": b, "ratio": ratio, "notes": notes}


def _typed(obj: dict, keys: dict[str, tuple[type, ...]], where: str) -> list[str]:
    errs = []
    if not isinstance(obj, dict):
        return [f"{where}: not an object"]
    for k, types in keys.items():
        if k not in obj:
            errs.append(f"{where}: missing key {k!r}")
        elif not isinstance(obj[k], types) or (bool not in types and isinstance(obj[k], bool)):
            errs.append(f"{where}.{k}: {type(obj[k]).__name__} is not {types}")
    extra = set(obj) - set(keys)
    if extra:
        errs.append(f"{where}: unexpected keys {sorted(extra)}")
    return errs


def validate_records(records: Any, where: str = "records") -> list[str]:
    """Schema errors of a list of result records (empty list: valid)."""
    if not isinstance(records, list):
        return [f"{where}: not a list"]
    errs: list[str] = []
    for i, r in enumerate(records):
        errs += _typed(r, RECORD_KEYS, f"{where}[{i}]")
    return errs


def validate(doc: Any) -> list[str]:
    """Schema errors of a results.json document (empty list: valid)."""
    errs = _typed(doc, TOP_KEYS, "results")
    if errs:
        return errs
    if doc["schema"] != SCHEMA:
        errs.append(f"results.schema: {doc['schema']!r} is not {SCHEMA!r}")
    errs += _typed(doc["cuda"], {"available": (bool,), "reason": (str,)}, "results.cuda")
    for i, s in enumerate(doc["steps"]):
        errs += _typed(s, STEP_KEYS, f"results.steps[{i}]")
    errs += validate_records(doc["records"], "results.records")
    if not all(isinstance(p, str) for p in doc["problems"]):
        errs.append("results.problems: not all strings")
    return errs


# ---- env / backends: facts gathered on the machine ----------------------------------------------
def _cmd(*args: str) -> str | None:
    """First lines of a command's output, or None where it is missing or fails."""
    if shutil.which(args[0]) is None:
        return None
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    out = (p.stdout or p.stderr).strip()
    return out if p.returncode == 0 and out else None


def _versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions from package metadata (nothing imported: torch takes seconds).

    A name matches its distribution and its variants (cupy → cupy-cuda13x, onnxruntime →
    onnxruntime-gpu); None where none is installed."""
    import importlib.metadata as md

    found: dict[str, str] = {}
    for dist in md.distributions():
        dname = (dist.metadata["Name"] or "").lower().replace("_", "-")
        for n in names:
            if n not in found and (dname == n or dname.startswith(n + "-")):
                found[n] = f"{dist.version}" + ("" if dname == n else f" ({dname})")
    return {n: found.get(n) for n in names}


def gather_env() -> dict[str, Any]:
    """Machine facts for the results: Python, GPU, CUDA compiler, versions of the key packages."""
    nvcc = _cmd("nvcc", "--version")
    env: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "gpu": _cmd("nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                    "--format=csv,noheader"),
        "nvcc": nvcc.splitlines()[-1] if nvcc else None,
        "packages": _versions(("numpy", "torch", "cupy", "onnx", "onnxruntime", "timm",
                               "torchvision", "pytest", "scikit-build-core", "pybind11", "pillow")),
    }
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        env["onnxruntime_providers"] = []
    return env


def probe_backends() -> dict[str, Any]:
    """affeq_rt.core.backends() as JSON, plus where affeq_rt was imported from."""
    try:
        import affeq_rt
        from affeq_rt.core import backends
    except Exception as e:  # noqa: BLE001
        return {"available": False, "reason": f"affeq_rt does not import: {e}", "backends": []}
    rows = [{"name": b.name, "available": b.available, "reason": b.reason} for b in backends()]
    cuda = next(r for r in rows if r["name"] == "cuda")
    return {"available": cuda["available"], "reason": cuda["reason"], "backends": rows,
            "affeq_rt": str(Path(affeq_rt.__file__).parent)}


# ---- assembly ------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_steps(path: Path) -> list[dict[str, Any]]:
    """steps.tsv (name, rc, seconds, log) as step records; rc 124/137 = timed out."""
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            name, rc, secs, log = line.split("\t")
            steps.append({"name": name, "rc": int(rc), "seconds": float(secs),
                          "timed_out": int(rc) in (124, 137), "log": log})
    return steps


def assemble(out: Path) -> dict[str, Any]:
    """Gather the step files under ``out`` into the results document (schema ``SCHEMA``)."""
    meta = _read_json(out / "run.json")
    steps = read_steps(out / "steps.tsv")
    problems = [] if meta else ["run.json missing or unreadable"]
    meta = meta or {}
    problems += [f"step {s['name']} failed (rc {s['rc']}{', timed out' if s['timed_out'] else ''}"
                f"): see {s['log']}" for s in steps if s["rc"] != 0]
    back = _read_json(out / "backends.json")
    if back is None:
        cuda = {"available": False, "reason": "not probed (the backends step wrote nothing)"}
    else:
        cuda = {"available": bool(back.get("available")), "reason": str(back.get("reason", ""))}
    dry = bool(meta.get("dry_run", False))
    if not cuda["available"] and not dry:
        problems.append(f"CUDA backend unavailable: {cuda['reason']}")
    records: list[dict[str, Any]] = []
    for part in BENCH_PARTS:
        path = out / "bench" / f"{part}.json"
        data = _read_json(path)
        if data is None:
            if any(s["name"] == f"bench-{part}" for s in steps):
                problems.append(f"{path.relative_to(out)} missing or unreadable")
            continue
        errs = validate_records(data.get("records"), f"bench/{part}.json")
        if errs:
            problems += errs
        else:
            records += data["records"]
    doc = {
        "schema": SCHEMA,
        "dry_run": dry,
        "ok": False,
        "started": str(meta.get("started", "")),
        "finished": now(),
        "git": meta.get("git", {}),
        "machine": _read_json(out / "env.json") or {},
        "options": meta.get("options", {}),
        "cuda": cuda,
        "steps": steps,
        "records": records,
        "problems": problems,
    }
    errs = validate(doc)
    doc["problems"] += [f"schema: {e}" for e in errs]
    doc["ok"] = not doc["problems"]
    return doc


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"


def table(doc: dict[str, Any]) -> str:
    """The short plain-text table printed last by gpu-check.sh."""
    lines = [f"{'step':<16} {'rc':>4} {'seconds':>8}"]
    lines += [f"{s['name']:<16} {s['rc']:>4} {s['seconds']:>8.1f}"
              + ("  TIMEOUT" if s["timed_out"] else "") for s in doc["steps"]]
    lines.append("")
    w = max([len(r["name"]) for r in doc["records"]] + [6])
    lines.append(f"{'record':<{w}} {'value':>10} {'baseline':>10} {'ratio':>7}  unit")
    for r in doc["records"]:
        lines.append(f"{r['name']:<{w}} {_fmt(r['value']):>10} {_fmt(r['baseline']):>10} "
                     f"{_fmt(r['ratio']):>7}  {r['unit']}")
    lines.append("")
    gpu = doc["machine"].get("gpu") or "no GPU"
    lines.append(f"cuda backend: {'available' if doc['cuda']['available'] else 'UNAVAILABLE'}"
                 f" ({doc['cuda']['reason']}); {gpu}{'; DRY RUN' if doc['dry_run'] else ''}")
    lines += [f"problem: {p}" for p in doc["problems"]]
    lines.append(f"result: {'OK' if doc['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: env | backends | assemble | validate."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "backends"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        if name == "backends":
            p.add_argument("--allow-missing", action="store_true",
                           help="exit 0 even where CUDA is unavailable (dry run)")
    sub.add_parser("assemble").add_argument("--out", type=Path, required=True)
    sub.add_parser("validate").add_argument("file", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "env":
        a.out.write_text(json.dumps(gather_env(), indent=1) + "\n")
        return 0
    if a.cmd == "backends":
        res = probe_backends()
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
        if not res["available"]:
            print(f"CUDA backend unavailable: {res['reason']}", file=sys.stderr)
            return 0 if a.allow_missing else 1
        return 0
    if a.cmd == "assemble":
        doc = assemble(a.out)
        (a.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(table(doc))
        return 0 if doc["ok"] else 1
    errs = validate(_read_json(a.file))
    for e in errs:
        print(e, file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
