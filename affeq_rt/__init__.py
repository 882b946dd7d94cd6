"""affeq-rt: affine feature equivalence between pretrained CNNs, as an inference toolkit.

The public API is re-exported here; the compiled core lives in ``affeq_rt._core``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backends import backends, resolve_device  # noqa: E402
from .errors import AffeqError  # noqa: E402

__all__ = ["AffeqError", "__version__", "backends", "resolve_device"]
