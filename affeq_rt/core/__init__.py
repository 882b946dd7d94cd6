"""Python face of the compiled core: Gram accumulation, fused head evaluation, float64 references,
the kernels behind one backend contract (core.kernels) and which backends this install has
(core.backends)."""

from affeq_rt.core.backends import backends, resolve_device
from affeq_rt.core.evaluate import HeadsResult, evaluate_heads
from affeq_rt.core.gram import GramAccumulator
from affeq_rt.core.reference import GramReference, evaluate_reference, gram_reference

__all__ = [
    "GramAccumulator",
    "GramReference",
    "HeadsResult",
    "backends",
    "evaluate_heads",
    "evaluate_reference",
    "gram_reference",
    "resolve_device",
]
