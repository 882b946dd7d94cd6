"""What a network or a hybrid sees: class activation maps through the map (``cam``), layer
views (``layers``) and robustness ablations (``ablate``)."""

from __future__ import annotations
