"""Which compiled backends this install has (cpu always; cuda where built and a GPU is seen)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from affeq_rt.errors import AffeqError, InternalError

# The compiled modules, imported once at module level; a missing one is reported when asked for.
try:
    from affeq_rt import _core as _CORE
    _CORE_ERROR: ImportError | None = None
except ImportError as _e:
    _CORE, _CORE_ERROR = None, _e
try:
    from affeq_rt import _core_cuda as _CORE_CUDA
    _CUDA_ERROR: ImportError | None = None
except ImportError as _e:
    _CORE_CUDA, _CUDA_ERROR = None, _e


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
    if _CORE is None:
        raise AffeqError(f"the compiled core affeq_rt._core is missing ({_CORE_ERROR})",
                         "reinstall with: pip install --no-build-isolation -e .")
    return _CORE


def cuda_core():
    """The CUDA compiled module (only called once :func:`cuda_status` said it is available)."""
    if _CORE_CUDA is None:
        raise InternalError(f"affeq_rt._core_cuda is not loaded ({_CUDA_ERROR})")
    return _CORE_CUDA


@lru_cache(maxsize=1)
def cuda_status() -> BackendStatus:
    """Whether the CUDA backend can run here: built, importable, cupy present, a GPU visible."""
    info = _build_info().get("cuda", "unknown")
    if info != "built":
        return BackendStatus("cuda", False, f"not compiled: {info}")
    if _CORE_CUDA is None:
        return BackendStatus("cuda", False, f"compiled module does not load: {_CUDA_ERROR}")
    try:
        import cupy  # noqa: F401
    except ImportError:
        return BackendStatus("cuda", False, "cupy is not installed (pip install 'affeq-rt[cuda]')")
    n, detail = _CORE_CUDA.probe()  # (device count, versions or the CUDA error text)
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
