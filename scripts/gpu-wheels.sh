#!/usr/bin/env bash
# Downloads the wheels folder scripts/gpu-check.sh --wheels DIR needs on an offline GPU machine
# (Python 3.12, manylinux x86-64; < 60 MiB): the [build-system] requires of pyproject.toml (read
# here, so a changed pin is followed), pytest, and what the registry network needs beside the
# machine's torch (timm, torchvision matching that torch, pyyaml, huggingface_hub, safetensors,
# pillow). The machine already has torch, cupy, onnx, onnxruntime, cmake and ninja.
#
#   scripts/gpu-wheels.sh DIR [--torch-version 2.x.y]   # run where a package index is reachable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT_MIB=60

usage() { echo "usage: scripts/gpu-wheels.sh DIR [--torch-version VERSION]" >&2; exit 2; }
DIR=""
TORCH=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --torch-version) TORCH=${2:?--torch-version needs a version}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "gpu-wheels: unknown option $1" >&2; usage ;;
    *) [[ -z "$DIR" ]] || usage; DIR=$1; shift ;;
  esac
done
[[ -n "$DIR" ]] || usage
if [[ -d "$DIR" && -n "$(ls -A "$DIR")" ]]; then
  echo "gpu-wheels: $DIR is not empty (the folder must hold exactly this set)" >&2
  exit 2
fi
mkdir -p "$DIR"

# torchvision must be the build made for the GPU machine's torch (pip refuses any other there).
if [[ -z "$TORCH" ]]; then
  TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null) || {
    echo "gpu-wheels: no torch here to read its version from; pass --torch-version" >&2; exit 2; }
  echo "gpu-wheels: torch $TORCH (this machine's; pass --torch-version for the GPU machine's)"
fi
TV=$("$PY" - "$TORCH" <<'PYEOF'
import sys
major, minor = (int(x) for x in sys.argv[1].split(".")[:2])
# torch 2.m pairs with torchvision 0.(m + 15) (2.5 -> 0.20, 2.14 -> 0.29), patch for patch.
patch = sys.argv[1].split(".")[2] if sys.argv[1].count(".") >= 2 else "0"
print(f"0.{minor + 15}.{patch}" if major == 2 else "")
PYEOF
)
[[ -n "$TV" ]] || { echo "gpu-wheels: cannot pair torch $TORCH with a torchvision" >&2; exit 2; }

# [build-system] requires (same reading as scripts/dev.sh; Linux markers kept).
mapfile -t BUILD < <("$PY" - <<'PYEOF'
import re
text = open("pyproject.toml").read()
block = re.search(r"^\[build-system\]$(.*?)^\[", text, re.S | re.M).group(1)
items = re.search(r"^requires = \[(.*?)\]", block, re.S | re.M).group(1)
for req in re.findall(r'"([^"]+)"', items):
    name, _, marker = req.partition(";")
    if "linux" in marker or not marker.strip():
        print(name.strip())
PYEOF
)
[[ ${#BUILD[@]} -gt 0 ]] || { echo "gpu-wheels: no [build-system] requires read" >&2; exit 1; }

DL=("$PY" -m pip download --disable-pip-version-check --only-binary=:all: --python-version 3.12
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
    --platform manylinux_2_34_x86_64 -d "$DIR")
# With dependencies: small pure/binary packages whose closures never reach torch.
"${DL[@]}" "${BUILD[@]}" pytest pyyaml huggingface_hub safetensors pillow
# Without: their torch pin would drag torch (GBs) into the folder; the GPU machine has torch.
"${DL[@]}" --no-deps "torchvision==$TV" timm

size=$(du -sb "$DIR" | cut -f1)
echo "gpu-wheels: $(find "$DIR" -name '*.whl' | wc -l) wheels, $((size / 1048576)) MiB in $DIR"
ls -1 "$DIR"
if (( size > LIMIT_MIB * 1048576 )); then
  echo "gpu-wheels: over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
