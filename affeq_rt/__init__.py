"""affeq-rt: affine feature equivalence between pretrained CNNs, as an inference toolkit.

The public API is re-exported here; the compiled core lives in ``affeq_rt._core``.
"""

from __future__ import annotations

from affeq_rt._version import __version__
from affeq_rt.core.backends import backends, resolve_device  # noqa: E402
from affeq_rt.errors import AffeqError  # noqa: E402

__all__ = ["AffeqError", "__version__", "backends", "resolve_device"]
