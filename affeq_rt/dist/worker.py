"""The work one Ray worker actor does: a shard of extraction or of the Gram pass, or one source's
evaluation pass. Plain Python (``ray.remote`` wraps it in ``dist.executor``), so it is testable
without Ray.

A worker opens its networks once (onnxruntime sessions, TensorRT engines) and keeps them for the
whole run. Features never leave the worker through Ray: extraction stages each shard's rows as
``.npy`` files on the store's (shared) filesystem, the Gram pass reduces them into a float64
state saved beside the maps file (or, without an output path, returned: O(d²), not O(n·d)).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path, ensure_writable_dir, read_json, write_json_atomic
from affeq_rt.io.maps import MapSet, load_maps
from affeq_rt.io.store import FeatureStore
from affeq_rt.method.evaluate import pass_labels, source_pass
from affeq_rt.method.extract import ImageOptions, Network, feature_batches, open_networks
from affeq_rt.method.fit import feed_rows

SHARD_DONE = "shard.json"  # written last: a shard folder without it is unfinished


def shard_name(start: int, stop: int) -> str:
    """Folder/file stem of the shard of samples ``start``…``stop`` (sorts in sample order)."""
    return f"{start:012d}-{stop:012d}"


def staged(folder: Path, start: int, stop: int) -> dict[str, Any] | None:
    """The record of a finished staged shard, or None."""
    f = folder / shard_name(start, stop) / SHARD_DONE
    return read_json(f, "staged shard") if f.is_file() else None


def state_files(folder: Path, stem: str) -> tuple[Path, Path, Path]:
    """(train state, held-out state, record) of one saved Gram shard or prefix."""
    return folder / f"{stem}.train.gram", folder / f"{stem}.holdout.gram", folder / f"{stem}.json"


class Worker:
    """One worker's sessions and the shard functions the driver calls on it."""

    def __init__(self, names: Sequence[str], images: ImageOptions | None,
                 exports: Mapping[str, str], samples: Sequence[Any] | None,
                 env: Mapping[str, str] | None = None) -> None:
        os.environ.update(env or {})  # the driver's AFFEQ_RT_* settings (registry, home)
        self.names = list(names)
        self.images = images or ImageOptions()
        self.exports = dict(exports)
        self.samples = list(samples) if samples is not None else []
        self._nets: list[Network] | None = None

    def start(self) -> int:
        """Open the networks now (all workers in parallel, before any shard) and return this
        worker's process id (the tests kill workers by it)."""
        if self.names:
            self.nets()
        return os.getpid()

    def nets(self) -> list[Network]:
        """The networks, opened on first use and checked against the driver's exports."""
        if self._nets is None:
            o = self.images
            nets = open_networks(self.names, provider=o.provider, export_root=o.export_root,
                                 random_weights=o.random_weights)
            for net in nets:
                want = self.exports.get(net.name)
                if want is not None and net.onnx_sha256 != want:
                    raise AffeqError(
                        f"worker on {os.uname().nodename} has another export of {net.name} "
                        f"({net.export_dir}) than the driver", "use one shared --export-root, or "
                        "copy the driver's export folder to every node")
            self._nets = nets
        return self._nets

    def _batches(self, start: int, stop: int, batch_size: int):
        return feature_batches(self.nets(), self.samples[:stop], batch_size, self.images.workers,
                               start=start)

    # -- extraction -------------------------------------------------------------------------
    def extract_shard(self, start: int, stop: int, batch_size: int, folder: str) -> dict[str, Any]:
        """Run every network over samples ``start``…``stop`` and stage the readable rows as
        ``folder/<shard>/<model>.npy`` (float32, as the networks returned them), then the record
        ``shard.json`` (rows, skipped). Returns the record."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        skipped: list[dict[str, Any]] = []
        for batch, feats in self._batches(start, stop, batch_size):
            for name in self.names:
                parts[name].append(feats[name])
            skipped += [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped]
        d = Path(folder) / shard_name(start, stop)
        shutil.rmtree(d, ignore_errors=True)  # a killed attempt's leftovers
        ensure_writable_dir(d)
        rows = 0
        for net in self.nets():
            x = (np.concatenate(parts[net.name]) if parts[net.name]
                 else np.zeros((0, net.dim), np.float32))
            rows = int(x.shape[0])
            with atomic_path(d / f"{net.name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, x)
        rec = {"start": start, "stop": stop, "rows": rows, "skipped": skipped}
        write_json_atomic(d / SHARD_DONE, rec)
        return rec

    # -- the Gram pass ----------------------------------------------------------------------
    def fit_shard(self, start: int, stop: int, batch_size: int, mask: np.ndarray, device: str,
                  folder: str | None) -> dict[str, Any]:
        """Accumulate samples ``start``…``stop`` into a fresh (training, held-out) pair of Gram
        states (``mask``: held-out flags of these samples). With ``folder`` the states are saved
        there (``<shard>.train.gram``, ``.holdout.gram``, then ``<shard>.json``) and the record is
        returned; without, the record carries the packed states."""
        dim = sum(net.dim for net in self.nets())
        acc_t, acc_h = GramAccumulator(dim, device=device), GramAccumulator(dim, device=device)
        skipped: list[dict[str, Any]] = []
        for batch, feats in self._batches(start, stop, batch_size):
            x = np.ascontiguousarray(np.concatenate([feats[m] for m in self.names], axis=1))
            feed_rows(acc_t, acc_h, x, mask[batch.start - start:batch.stop - start][batch.ok])
            skipped += [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped]
        rec: dict[str, Any] = {"start": start, "stop": stop, "skipped": skipped}
        if folder is None:
            return {**rec, "train": acc_t.state(), "holdout": acc_h.state()}
        f_t, f_h, f_rec = state_files(Path(folder), shard_name(start, stop))
        acc_t.save(f_t)
        acc_h.save(f_h)
        write_json_atomic(f_rec, rec)
        return rec

    # -- evaluation -------------------------------------------------------------------------
    def evaluate_source(self, store: str, maps: MapSet | str, src: str, chosen: Sequence[str],
                        device: str) -> Any:
        """One source's compiled pass (``method.evaluate.source_pass``) over the store on disk."""
        st = FeatureStore.open(store)
        ms = load_maps(maps) if isinstance(maps, str) else maps
        heads = {m: st.head(m) for m in chosen}
        res, _, _ = source_pass(st, src, list(chosen), heads, ms, pass_labels(st), device)
        return res
