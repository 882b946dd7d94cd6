"""What a pass carries and what it feeds: ``Chunk`` (rows of consecutive samples), ``Rows`` (what an
executor walks) and ``Reducer`` (a statistic of the pass: update, merge in order, state).

A reducer's **state** is a flat ``{key: value}`` dict whose values are numpy arrays or JSON values
(numbers, strings, lists, dicts). It is the one format for everything that leaves a reducer: a
checkpoint (``engine.checkpoint``) and what a cluster worker sends back (``affeq_rt.cluster``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

State = dict[str, Any]  # numpy arrays and JSON values only


@dataclass
class Chunk:
    """Rows of samples ``start``…``stop``.

    ``columns`` holds each model's features ``[rows, d_m]`` (float32 from networks, as stored from a
    feature store); ``x`` is the joint row [F_1 … F_k] (float32, C-contiguous), built on first use
    in ``columns`` order. ``ok`` marks the samples that have a row (None: all of them); ``skipped``
    lists the others as ``{index, path, reason}``.
    """

    start: int
    stop: int
    columns: Mapping[str, np.ndarray]
    ok: np.ndarray | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    _x: np.ndarray | None = field(default=None, repr=False)

    @property
    def x(self) -> np.ndarray:
        """The joint rows ``[rows, Σd]`` float32."""
        if self._x is None:
            parts = [np.asarray(c, np.float32) for c in self.columns.values()]
            self._x = np.ascontiguousarray(np.concatenate(parts, axis=1))
        return self._x

    @property
    def index(self) -> np.ndarray:
        """The sample index of each row (readable samples only)."""
        i = np.arange(self.start, self.stop)
        return i if self.ok is None else i[self.ok]


@runtime_checkable
class Rows(Protocol):
    """What an executor walks: ``n`` samples in chunks on a grid of ``grain`` samples."""

    @property
    def n(self) -> int:
        """Samples."""
        ...

    @property
    def grain(self) -> int:
        """Samples per chunk: every chunk but the last is this long, so shard edges on multiples
        of it fall between chunks."""
        ...

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        """Chunks of samples ``start``…``stop`` (None: to the end), in order."""
        ...


@runtime_checkable
class Reducer(Protocol):
    """One statistic of a pass.

    ``update(chunk)`` adds a chunk's rows; ``merge(other)`` adds a reducer that covers the samples
    right after this one's (executors merge in shard order, so results never depend on worker
    count or timing); ``fresh()`` is an empty reducer configured like this one (a worker starts
    each shard with one: it must be cheap to pickle); ``state()``/``load(state)`` move the exact
    statistic out of and into a reducer (checkpoints, workers). ``load`` is called on a fresh one.
    """

    def update(self, chunk: Chunk) -> None:
        """Add the rows of ``chunk``."""
        ...

    def merge(self, other: Any) -> None:
        """Add ``other`` (same configuration, the following samples)."""
        ...

    def fresh(self) -> Any:
        """An empty reducer of the same configuration."""
        ...

    def state(self) -> State:
        """The exact statistic: numpy arrays and JSON values."""
        ...

    def load(self, state: State) -> None:
        """Restore :meth:`state` into this (fresh) reducer."""
        ...
