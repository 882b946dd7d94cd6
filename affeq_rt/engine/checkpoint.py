"""The one checkpoint format of a pass: ``pass.json`` (identity, grid, samples done) and one
``.npz`` with every reducer's arrays, committed atomically, the arrays first.

Layout of the folder (e.g. ``maps.safetensors.partial/``)::

    pass.json       {"format": 2, "identity": …, "shard": S, "done": N, "seq": k,
                     "npz": "state.k.npz", "sha256": …, "json": {reducer: {key: JSON value}}}
    state.k.npz     "reducer/key" -> array, for every array of every reducer's state

A checkpoint of another pass (identity differs) is refused with one line, as is one written by an
older affeq-rt (no ``pass.json`` but other files: delete it to start afresh).
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.engine.reducer import Reducer, State
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import ensure_writable_dir, read_json, write_bytes_atomic, write_json_atomic

FORMAT = 2  # 1 was version 0.2's fit.json + .gram files (and a second one under ray/)
MANIFEST = "pass.json"


def _differ(found: Any, want: Mapping[str, Any]) -> str:
    """Which settings differ between a saved identity and this run's, in words."""
    if not isinstance(found, dict):
        return "no identity recorded"
    keys = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
    return (", ".join(keys) or "identity") + (" differs" if len(keys) == 1 else " differ")


def _split(states: Mapping[str, State]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    arrays: dict[str, np.ndarray] = {}
    js: dict[str, dict] = {}
    for name, st in states.items():
        js[name] = {}
        for k, v in st.items():
            if isinstance(v, np.ndarray):
                arrays[f"{name}/{k}"] = v
            else:
                js[name][k] = v
    return arrays, js


class PassCheckpoint:
    """The checkpoint of one resumable pass in ``folder``; ``identity`` is what it must match.
    It commits when a shard ends on or past a multiple of ``every`` samples, and at the end."""

    def __init__(self, folder: str | Path, identity: Mapping[str, Any], every: int = 20000
                 ) -> None:
        self.folder = Path(folder)
        self.identity = dict(identity)
        self.every = max(int(every), 1)
        self.record: dict[str, Any] | None = None
        mf = self.folder / MANIFEST
        if mf.is_file():
            rec = read_json(mf, "checkpoint")
            if not isinstance(rec, dict) or rec.get("format") != FORMAT:
                self._refuse("was written by another version of affeq-rt")
            found = rec.get("identity")
            if found != self.identity:
                self._refuse(f"belongs to a different run ({_differ(found, self.identity)})")
            self.record = rec
        elif self.folder.is_dir() and any(self.folder.iterdir()):
            self._refuse("was written by another version of affeq-rt")

    def _refuse(self, why: str) -> None:
        raise AffeqError(f"checkpoint {self.folder} {why}",
                         "delete that folder to start afresh, or choose another --out")

    @property
    def done(self) -> int:
        """Samples the saved state covers (0: nothing saved)."""
        return int(self.record["done"]) if self.record else 0

    @property
    def shard(self) -> int | None:
        """The shard size the pass started with (a resumed pass keeps its grid)."""
        return int(self.record["shard"]) if self.record else None

    def due(self, last: int, stop: int, n: int) -> bool:
        """Commit after a shard ending at ``stop``: past the next multiple of ``every``, or the
        end (positions fixed by the data, never the clock: a resume replays the same grid)."""
        return stop // self.every > last // self.every or stop == n

    def restore(self, reducers: Mapping[str, Reducer]) -> None:
        """Load the saved state into ``reducers`` (fresh ones); nothing when none is saved."""
        if self.record is None:
            return
        f = self.folder / self.record["npz"]
        try:
            data = f.read_bytes()
        except OSError as e:
            raise AffeqError(f"cannot read checkpoint {f}: {e.strerror}",
                             "delete the checkpoint folder to start afresh") from None
        if hashlib.sha256(data).hexdigest() != self.record["sha256"]:
            raise AffeqError(f"checkpoint {f} fails its checksum (damaged)",
                             "delete the checkpoint folder to start afresh")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        for name, r in reducers.items():
            st: State = dict(self.record["json"].get(name, {}))
            pre = f"{name}/"
            st.update({k[len(pre):]: v for k, v in arrays.items() if k.startswith(pre)})
            r.load(st)

    def save(self, reducers: Mapping[str, Reducer], done: int, shard: int) -> None:
        """Commit the reducers' states covering samples ``0…done`` (arrays, then the manifest)."""
        ensure_writable_dir(self.folder)
        arrays, js = _split({k: r.state() for k, r in reducers.items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        seq = (int(self.record["seq"]) if self.record else 0) + 1
        npz = f"state.{seq}.npz"
        write_bytes_atomic(self.folder / npz, data)
        rec = {"format": FORMAT, "identity": self.identity, "shard": int(shard),
               "done": int(done), "seq": seq, "npz": npz,
               "sha256": hashlib.sha256(data).hexdigest(), "json": js}
        write_json_atomic(self.folder / MANIFEST, rec)
        self.record = rec
        for old in self.folder.glob("state.*.npz"):
            if old.name != npz:
                old.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint (the pass's result is saved)."""
        shutil.rmtree(self.folder, ignore_errors=True)
