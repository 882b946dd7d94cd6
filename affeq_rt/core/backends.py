"""Which compiled backends this install has (cpu always; cuda where built and a GPU is seen)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

from affeq_rt.errors import AffeqError

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend with the reason when it is missing."""

    name: str
    available: bool
    reason: str


@lru_cache(maxsize=1)
def _build_info() -> dict:
    try:
        return json.loads(resources.files("affeq_rt").joinpath("_build_info.json").read_text())
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return {"cuda": "unknown (no build info: affeq_rt was not installed with pip)"}


@lru_cache(maxsize=1)
def cpu_core():
    """The CPU compiled module, or an AffeqError explaining how to build it."""
    try:
        from affeq_rt import _core
    except ImportError as e:
        raise AffeqError(f"the compiled core affeq_rt._core is missing ({e})",
                         "reinstall with: pip install --no-build-isolation -e .") from None
    return _core


@lru_cache(maxsize=1)
def cuda_status() -> BackendStatus:
    """Whether the CUDA backend can run here: built, importable, cupy present, a GPU visible."""
    info = _build_info().get("cuda", "unknown")
    if info != "built":
        return BackendStatus("cuda", False, f"not compiled: {info}")
    try:
        from affeq_rt import _core_cuda
    except ImportError as e:
        return BackendStatus("cuda", False, f"compiled module does not load: {e}")
    try:
        import cupy  # noqa: F401
    except ImportError:
        return BackendStatus("cuda", False, "cupy is not installed (pip install 'affeq-rt[cuda]')")
    n, detail = _core_cuda.probe()  # (device count, versions or the CUDA error text)
    if n <= 0:
        return BackendStatus("cuda", False, f"no CUDA GPU visible ({detail})")
    return BackendStatus("cuda", True, f"{n} GPU(s)")


def backends() -> list[BackendStatus]:
    """Status of every backend, CPU first."""
    try:
        cpu_core()
        cpu = BackendStatus("cpu", True, "built")
    except AffeqError as e:
        cpu = BackendStatus("cpu", False, str(e))
    return [cpu, cuda_status()]


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda`` to the backend that will run; raise if CUDA is asked for but absent."""
    if device not in ("auto", "cpu", "cuda"):
        raise AffeqError(f"unknown device {device!r}", "use one of auto, cpu, cuda")
    st = cuda_status()
    if device == "cuda" and not st.available:
        raise AffeqError(f"CUDA backend requested but unavailable: {st.reason}", "use --device cpu")
    if device == "auto":
        return "cuda" if st.available else "cpu"
    return device
