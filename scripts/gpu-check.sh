#!/usr/bin/env bash
# shellcheck disable=SC2317  # step functions run indirectly: step NAME FUNCTION (bash -c)
# The GPU paths checked in one shot (issue 15): build affeq-rt with its CUDA backend from this tree
# into a fresh venv (offline: --wheels DIR from scripts/gpu-wheels.sh), probe the backends, run the
# `gpu`-marked tests and bench/gpu.py (gram, evaluate, extract, decode), write logs + results.json to --out DIR (or $OUT), print a table.
#
#   scripts/gpu-check.sh --wheels /path/wheels --out /tmp/gpu-out   # on a GPU machine, < 8 min
#   scripts/gpu-check.sh --dry-run --out /tmp/gpu-dry              # the script's logic, on any CPU
#
# Needs on the GPU machine: nvcc, Python 3.12 with torch, cupy-cuda13x, onnx, onnxruntime,
# pybind11, scikit-build-core, cmake, ninja; everything else comes from --wheels (no network).
# Every step runs under a timeout; a failed step never stops the others; each exit status lands
# in results.json. Exit 0 only when every step passed and the CUDA backend was available.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: scripts/gpu-check.sh [--out DIR] [--wheels DIR] [--dry-run] [--skip-build]
                            [--timeout SECONDS] [--budget SECONDS] [--python PYTHON]
  --out DIR        results folder (default: $OUT); created, must be empty or absent
  --wheels DIR     wheels folder made by scripts/gpu-wheels.sh (offline installs)
  --dry-run        check this script's logic without a GPU: nothing is built, tests are only
                   collected, benchmarks run on the CPU with NumPy stand-ins and tiny sizes
  --skip-build     use the affeq_rt already importable by --python instead of building a venv
  --timeout S      per-step timeout in seconds (default 240)
  --budget S       whole-run limit in seconds (default 450): a step gets at most what is left,
                   a step with under 5 s left is recorded as timed out without running
  --python PY      interpreter to build the venv from (default: python3.12 if present, else python3)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${OUT:-}
WHEELS=""
DRY=0
SKIP_BUILD=0
STEP_TIMEOUT=240
BUDGET=450
BASE_PY=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUTDIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUTDIR=${1#*=}; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --wheels=*) WHEELS=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --timeout) STEP_TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
    --timeout=*) STEP_TIMEOUT=${1#*=}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    --python) BASE_PY=${2:?--python needs an interpreter}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "$OUTDIR" ]]; then
  echo "gpu-check: give the results folder with --out DIR or \$OUT" >&2
  exit 2
fi
for v in "$STEP_TIMEOUT" "$BUDGET"; do
  if ! [[ "$v" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu-check: --timeout/--budget must be a positive whole number of seconds, not '$v'" >&2
    exit 2
  fi
done
DEADLINE=$(( $(date +%s) + BUDGET ))
if [[ -n "$WHEELS" ]]; then
  if [[ ! -d "$WHEELS" ]]; then
    echo "gpu-check: --wheels $WHEELS is not a folder" >&2
    exit 2
  fi
  WHEELS=$(cd "$WHEELS" && pwd)
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
if [[ -n "$(ls -A "$OUTDIR")" ]]; then
  echo "gpu-check: $OUTDIR is not empty (results are never mixed with an earlier run)" >&2
  exit 2
fi
if [[ -z "$BASE_PY" ]]; then
  if [[ $DRY -eq 0 ]] && command -v python3.12 >/dev/null; then BASE_PY=python3.12; else BASE_PY=python3; fi
fi
# Helpers (env, backends, assemble) are stdlib-only and run from OUTDIR so that the checkout's
# source folder never shadows the installed affeq_rt.
RESULTS_PY=("$BASE_PY" "$REPO/bench/gpu_results.py")
mkdir -p "$OUTDIR/logs" "$OUTDIR/bench" "$OUTDIR/work"
: >"$OUTDIR/steps.tsv"

git_commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
git_dirty=false
[[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]] && git_dirty=true
"$BASE_PY" - "$OUTDIR/run.json" "$DRY" "$git_commit" "$git_dirty" "$WHEELS" "$SKIP_BUILD" \
  "$STEP_TIMEOUT" "$BUDGET" "$BASE_PY" "$REPO" <<'PYEOF' || { echo "gpu-check: $BASE_PY cannot run" >&2; exit 2; }
import json, sys, time
out, dry, commit, dirty, wheels, skip, timeout, budget, py, repo = sys.argv[1:]
run = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": dry == "1",
       "git": {"commit": commit, "dirty": dirty == "true"},
       "options": {"wheels": wheels, "skip_build": skip == "1", "step_timeout": int(timeout),
                   "budget": int(budget), "python": py, "repo": repo}}
open(out, "w").write(json.dumps(run, indent=1) + "\n")
PYEOF

STEP_NO=0
# step NAME CMD...: run CMD under the timeout from OUTDIR/work, log to logs/NN-NAME.log, record rc.
step() {
  local name=$1; shift
  STEP_NO=$((STEP_NO + 1))
  local log
  log=$(printf 'logs/%02d-%s.log' "$STEP_NO" "$name")
  local left=$(( DEADLINE - $(date +%s) )) limit=$STEP_TIMEOUT
  (( left < limit )) && limit=$left
  echo "== [$STEP_NO] $name ($(date -u +%H:%M:%S), timeout ${limit}s)"
  local t0 rc
  t0=$(date +%s.%N)
  if (( left < 5 )); then
    echo "not run: the --budget of ${BUDGET}s is spent" >"$OUTDIR/$log"
    rc=124
  else
    # bash -c: steps may be this script's functions (exported below); timeout kills the group.
    (cd "$OUTDIR/work" && timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@") \
      >"$OUTDIR/$log" 2>&1
    rc=$?
  fi
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$log" >>"$OUTDIR/steps.tsv"
  echo "   rc $rc, ${secs}s, $log"
  tail -n 3 "$OUTDIR/$log" | sed 's/^/   | /'
  return 0
}

# Build requirements of pyproject.toml (same reading as scripts/dev.sh), one per line.
build_requires() {
  "$BASE_PY" - "$REPO/pyproject.toml" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^\[build-system\]$(.*?)^\[", text, re.S | re.M).group(1)
items = re.search(r"^requires = \[(.*?)\]", block, re.S | re.M).group(1)
for req in re.findall(r'"([^"]+)"', items):
    name, _, marker = req.partition(";")
    if "linux" in marker or not marker.strip():  # the GPU machine is Linux
        print(name.strip())
PYEOF
}

# Runtime packages the checks need beyond the machine's torch/cupy/onnx/onnxruntime: tests
# (pytest), the registry network (timm, needs torchvision + pyyaml + huggingface_hub +
# safetensors, PIL). torchvision must match torch: installed with its deps so pip refuses a
# mismatch (then only the extraction benchmark fails).
RUNTIME_PKGS="pytest pyyaml huggingface_hub safetensors pillow"  # a string: exported to steps

# The build step: fresh venv over the system's packages, build requirements from the wheels,
# then the package itself built from this tree (CUDA architecture of the visible GPU only).
do_build() {
  set -e
  local venv=$1
  "$BASE_PY" -m venv --system-site-packages "$venv"
  local vpy="$venv/bin/python"
  local pipi=("$vpy" -m pip install --disable-pip-version-check --no-input)
  local reqs
  mapfile -t reqs < <(build_requires)
  if [[ -n "$WHEELS" ]]; then
    pipi+=(--no-index --find-links "$WHEELS")
    # exactly the wheels folder: no find-links from a pip.conf or the environment
    export PIP_CONFIG_FILE=/dev/null
    unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
    echo "+ build requirements from $WHEELS: ${reqs[*]}"
    "${pipi[@]}" "${reqs[@]}"
  else
    echo "+ no --wheels: the build requirements must already be installed: ${reqs[*]}"
  fi
  local cfg=()
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
  if [[ "$cap" =~ ^[0-9]+$ ]]; then
    cfg+=(--config-settings="cmake.define.AFFEQ_CUDA_ARCHITECTURES=$cap")
  fi
  echo "+ building affeq-rt from $REPO (CUDA arch: ${cap:-default})"
  # cmake.verbose: the compile lines (nvcc -arch …) land in the log.
  cfg+=(--config-settings=build.verbose=true)
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "${pipi[@]}" --no-build-isolation --no-deps -v "${cfg[@]}" "$REPO"
  # What was built, read without importing affeq_rt (its runtime dependencies come in `deps`).
  "$vpy" - <<'PYEOF'
import importlib.util, json, pathlib, sys
pkg = pathlib.Path(importlib.util.find_spec("affeq_rt").origin).parent
info = json.loads((pkg / "_build_info.json").read_text())
print(pkg, info, sorted(p.name for p in pkg.glob("_core*.so")))
sys.exit(0 if info.get("cuda") == "built" and list(pkg.glob("_core_cuda*.so")) else 1)
PYEOF
}

# Runtime extras, best effort: a missing one fails this step only.
do_deps() {
  local vpy=$1 rc=0
  local pipi=("$vpy" -m pip install --disable-pip-version-check --no-input)
  if [[ -n "$WHEELS" ]]; then
    pipi+=(--no-index --find-links "$WHEELS")
    export PIP_CONFIG_FILE=/dev/null
    unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
  fi
  local missing=()
  for p in $RUNTIME_PKGS; do
    "$vpy" -m pip show -q "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "+ installing ${missing[*]}"
    "${pipi[@]}" "${missing[@]}" || rc=1
  fi
  if ! "$vpy" -c "import torchvision" >/dev/null 2>&1; then
    echo "+ installing torchvision (must match torch $("$vpy" -c 'import torch; print(torch.__version__)'))"
    "${pipi[@]}" torchvision || rc=1
  fi
  if ! "$vpy" -m pip show -q timm >/dev/null 2>&1; then
    echo "+ installing timm (--no-deps: its dependencies are above)"
    "${pipi[@]}" --no-deps timm || rc=1
  fi
  "$vpy" -c "import pytest, timm, torchvision; print('pytest', pytest.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)" || rc=1
  return "$rc"
}

plan_build() {
  # Dry run of the build step: the plan, and the wheels folder holds every build requirement.
  local reqs rc=0
  mapfile -t reqs < <(build_requires)
  [[ ${#reqs[@]} -gt 0 ]] || { echo "cannot read [build-system] requires"; return 1; }
  echo "would: $BASE_PY -m venv --system-site-packages VENV"
  echo "would: VENV/bin/python -m pip install --no-index --find-links ${WHEELS:-WHEELS} ${reqs[*]}"
  echo "would: VENV/bin/python -m pip install --no-index --find-links ${WHEELS:-WHEELS} --no-build-isolation --no-deps $REPO"
  echo "would: install $RUNTIME_PKGS torchvision timm from the wheels where missing"
  if [[ -n "$WHEELS" ]]; then
    local r name
    # shellcheck disable=SC2086 # RUNTIME_PKGS is a word list
    for r in "${reqs[@]}" $RUNTIME_PKGS torchvision timm; do
      name=$(echo "$r" | sed -E 's/[<>=!~; ].*//' | tr 'A-Z-' 'a-z_')
      local ver="*"  # an exact pin (name==version) must be that version's wheel
      [[ "$r" == *"=="* ]] && ver=${r#*==}
      if compgen -G "$WHEELS/${name}-${ver}-*.whl" >/dev/null \
         || compgen -G "$WHEELS/${name//_/-}-${ver}-*.whl" >/dev/null; then
        echo "ok: $r in $WHEELS"
      else
        echo "MISSING: no wheel for $r in $WHEELS"; rc=1
      fi
    done
  fi
  return "$rc"
}

export REPO WHEELS BASE_PY RUNTIME_PKGS
export -f build_requires do_build do_deps plan_build

# gpu-marked test files: those that use the marker (collecting every test file would need every
# optional package, which the GPU machine lacks).
mapfile -t GPU_TESTS < <(grep -lE 'pytest\.mark\.gpu' "$REPO"/tests/test_*.py)
if [[ ${#GPU_TESTS[@]} -eq 0 ]]; then
  GPU_TESTS=("$REPO/tests/no-gpu-marked-test-files")  # pytest then fails this step, visibly
fi

echo "gpu-check: out $OUTDIR, dry run $DRY, $(date -u +%H:%M:%S) UTC"
step env "${RESULTS_PY[@]}" env --out "$OUTDIR/env.json"

PY=$BASE_PY
if [[ $DRY -eq 1 ]]; then
  step build plan_build
elif [[ $SKIP_BUILD -eq 0 ]]; then
  VENV=$(mktemp -d "${TMPDIR:-/tmp}/affeq-gpu-venv.XXXXXX")
  step build do_build "$VENV"
  PY="$VENV/bin/python"
  step deps do_deps "$PY"
  echo "   venv kept for a quicker rerun: --skip-build --python $PY"
fi

if [[ $DRY -eq 1 ]]; then
  step backends "$PY" "$REPO/bench/gpu_results.py" backends --allow-missing --out "$OUTDIR/backends.json"
else
  step backends "$PY" "$REPO/bench/gpu_results.py" backends --out "$OUTDIR/backends.json"
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO"
        -m gpu -rs --junitxml "$OUTDIR/gpu-tests.xml")
if [[ $DRY -eq 1 ]]; then
  step gpu-tests "${PYTEST[@]}" --collect-only -q "${GPU_TESTS[@]}"
else
  step gpu-tests "${PYTEST[@]}" -v "${GPU_TESTS[@]}"
fi

BENCH=("$PY" "$REPO/bench/gpu.py")
[[ $DRY -eq 1 ]] && BENCH+=(--dry-run)
for part in gram evaluate extract decode; do
  step "bench-$part" "${BENCH[@]}" --only "$part" --out "$OUTDIR/bench/$part.json"
done

echo "== results ($(date -u +%H:%M:%S))"
"${RESULTS_PY[@]}" assemble --out "$OUTDIR" | tee "$OUTDIR/table.txt"
rc=${PIPESTATUS[0]}
echo "gpu-check: results $OUTDIR/results.json, logs $OUTDIR/logs/, exit $rc"
exit "$rc"
