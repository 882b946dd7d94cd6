"""Row sources for ``fit``: joint feature rows [F_1 … F_k] of the same samples, in sample order.

One protocol (:class:`RowSource`), three implementations: in-memory arrays (:class:`ArraySource`),
a feature store or anything with its reading protocol (:class:`StoreSource`), and an image folder
(:class:`ImageSource`: networks opened through ``method.images``' building blocks, each image
decoded once). :func:`row_source` picks one for what the caller passed.

Groups (issue 11): several rows can come from one source image (crops and flips of one photo).
Held-out statistics and cross-validation must keep a group's rows together, or they score a map on
views of photos it was fitted on. A sample's group is read from its file name: ``NAME__VIEW.ext``
(two underscores) belongs to group ``NAME`` in its folder (:func:`group_key`); any other file is its
own group. In-memory arrays take ``groups=`` explicitly. ``groups()`` returns int ids [n], equal ids
= one group, or None (every sample its own group).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from affeq_rt.data.gpu_decode import device_of_providers
from affeq_rt.data.preprocess import resolve_pipeline
from affeq_rt.data.readers import DataSource
from affeq_rt.engine.reducer import Chunk
from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head
from affeq_rt.io.store import FeatureStore, StoreLike
from affeq_rt.method.images import (
    ImageOptions,
    Network,
    feature_batches,
    load_data,
    open_networks,
    parse_models,
    spec_dict,
)

CHUNK = 4096  # samples per chunk of array and store sources
GROUP_SEP = "__"  # NAME__VIEW.ext: the views of one source image share the group NAME


def group_key(path: str) -> str:
    """The group of an image file: ``dir/NAME`` for ``dir/NAME__VIEW.ext``, else the path itself."""
    p = Path(path)
    name = p.stem.split(GROUP_SEP, 1)[0]
    return str(p.parent / name) if GROUP_SEP in p.stem and name else str(path)


def group_ids(keys: Sequence[Any]) -> np.ndarray | None:
    """int64 ids [n] in order of first appearance (equal keys = equal ids); None when every key is
    distinct (each sample its own group)."""
    seen: dict[Any, int] = {}
    ids = np.fromiter((seen.setdefault(k, len(seen)) for k in keys), np.int64, len(keys))
    return None if len(seen) == len(keys) else ids


def path_groups(paths: Sequence[str]) -> np.ndarray | None:
    """:func:`group_ids` of the :func:`group_key` of each path."""
    return group_ids([group_key(p) for p in paths])


@runtime_checkable
class RowSource(Protocol):
    """What ``fit`` reads: model names, widths, sample count, joint rows, heads, metadata."""

    @property
    def names(self) -> list[str]:
        """The models, in joint-vector order."""
        ...

    @property
    def n(self) -> int:
        """Samples (rows, or images of which some may be unreadable)."""
        ...

    def dims(self) -> dict[str, int]:
        """Feature width per model."""
        ...

    @property
    def grain(self) -> int:
        """Samples per chunk (shards of a pass are multiples of it)."""
        ...

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        """Rows of samples ``start``…``stop`` (None: to the end), in order."""
        ...

    def heads(self) -> dict[str, Head] | None:
        """Each model's classifier (background rows stripped), or None when unknown."""
        ...

    def arrays(self) -> Mapping[str, Any] | None:
        """Random-access [n, d] features per model (Adam), or None when not addressable."""
        ...

    def describe(self) -> dict[str, Any]:
        """The maps file's ``source`` entry."""
        ...

    def specs(self) -> dict[str, dict[str, Any]]:
        """The maps file's ``specs`` entry."""
        ...

    def identity(self) -> dict[str, Any] | None:
        """What a checkpoint must match to resume; None: this source is not checkpointed."""
        ...

    # Optional (read with :func:`source_groups` / :func:`source_labels`; absent = None):
    # ``groups() -> int64 [n] | None`` and ``labels() -> int64 [n] | None`` (−1 unknown).


def source_groups(rows: Any) -> np.ndarray | None:
    """A row source's group ids [n] (None: every sample its own group)."""
    fn = getattr(rows, "groups", None)
    return fn() if callable(fn) else None


def source_labels(rows: Any) -> np.ndarray | None:
    """A row source's labels [n] (None when unknown)."""
    fn = getattr(rows, "labels", None)
    lab = fn() if callable(fn) else None
    return None if lab is None or bool((np.asarray(lab) < 0).all()) else np.asarray(lab, np.int64)


def model_slices(names: Sequence[str], dims: Mapping[str, int]) -> dict[str, slice]:
    """Where each model's features sit in the joint row [F_1 … F_k]."""
    out, o = {}, 0
    for n in names:
        out[n] = slice(o, o + int(dims[n]))
        o += int(dims[n])
    return out


def parse_names(models: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or a list → names (blanks dropped); None or empty → None (all models)."""
    if models is None:
        return None
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models)]
    return [m for m in names if m] or None


def _array_chunks(arrays: Mapping[str, Any], start: int, stop: int,
                  size: int = CHUNK) -> Iterator[Chunk]:
    """Chunks of ``size`` samples of row-aligned arrays (views; joint rows on first use)."""
    for a in range(start, stop, size):
        b = min(a + size, stop)
        yield Chunk(a, b, {m: x[a:b] for m, x in arrays.items()})


class ArraySource:
    """Row-aligned in-memory features ``{model: [n, d]}`` (and optionally the heads)."""

    def __init__(self, arrays: Mapping[str, Any], models: str | Sequence[str] | None = None,
                 max_images: int | None = None,
                 heads: Mapping[str, Head] | None = None, groups: Sequence[Any] | None = None,
                 labels: np.ndarray | None = None) -> None:
        names = parse_names(models) or list(arrays)
        missing = [m for m in names if m not in arrays]
        if missing:
            raise AffeqError(f"no features given for {', '.join(missing)}",
                             "pass an array for every model")
        counts = {int(arrays[m].shape[0]) for m in names}
        if len(counts) > 1:
            raise AffeqError("feature arrays have different row counts",
                             "pass features of the same images, row-aligned")
        n = counts.pop() if counts else 0
        self._names = names
        self._n = min(n, max_images or n)
        self._arrays = {m: arrays[m] for m in names}
        self._heads = dict(heads) if heads is not None else None
        for what, v in (("groups", groups), ("labels", labels)):
            if v is not None and len(v) < n:
                raise AffeqError(f"{what} has {len(v)} entries for {n} rows",
                                 f"pass one {what[:-1]} per row")
        self._groups = group_ids(list(groups)[:self._n]) if groups is not None else None
        self._labels = np.asarray(labels, np.int64)[:self._n] if labels is not None else None

    def groups(self) -> np.ndarray | None:
        """The groups given (ids), or None: every row its own group."""
        return self._groups

    def labels(self) -> np.ndarray | None:
        """The labels given (−1 = unknown), or None."""
        return self._labels

    @property
    def names(self) -> list[str]:
        """The models, in joint-vector order."""
        return self._names

    @property
    def n(self) -> int:
        """Rows used."""
        return self._n

    def dims(self) -> dict[str, int]:
        """Feature width per model."""
        return {m: int(a.shape[1]) for m, a in self._arrays.items()}

    grain = CHUNK

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        """Rows in chunks of :data:`CHUNK`."""
        yield from _array_chunks(self._arrays, start, self._n if stop is None else stop)

    def heads(self) -> dict[str, Head] | None:
        """The heads given, if any."""
        return self._heads

    def arrays(self) -> Mapping[str, Any]:
        """The arrays, cut to :attr:`n` rows."""
        return {m: a[:self._n] for m, a in self._arrays.items()}

    def describe(self) -> dict[str, Any]:
        """``{"kind": "arrays", "n": n}``."""
        return {"kind": "arrays", "n": self._n}

    def specs(self) -> dict[str, dict[str, Any]]:
        """None known."""
        return {}

    def identity(self) -> None:
        """Arrays are not checkpointed."""
        return


class StoreSource:
    """A :class:`~affeq_rt.io.store.FeatureStore` (or an in-memory ``ArrayStore``)."""

    def __init__(self, store: StoreLike, models: str | Sequence[str] | None = None,
                 max_images: int | None = None, chunk: int = CHUNK) -> None:
        self.store = store
        self.grain = int(chunk)  # rows per chunk (evaluate reads larger ones: one upload each)
        self._names = parse_names(models) or list(store.models)
        self._dims = {m: int(store.features(m).shape[1]) for m in self._names}  # AffeqError
        self._n = min(int(store.n), max_images or int(store.n))

    @property
    def names(self) -> list[str]:
        """The models, in joint-vector order."""
        return self._names

    @property
    def n(self) -> int:
        """Rows used."""
        return self._n

    def dims(self) -> dict[str, int]:
        """Feature width per model."""
        return dict(self._dims)

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        """Rows in chunks of :attr:`grain` (read from the memory-mapped arrays)."""
        parts = {m: self.store.features(m) for m in self._names}
        yield from _array_chunks(parts, start, self._n if stop is None else stop, self.grain)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a cluster worker: a store on disk travels as its path (reopened there)."""
        path = getattr(self.store, "path", None)
        st = dict(self.__dict__)
        if path is not None:
            st["store"] = str(path)
        return st

    def __setstate__(self, st: dict[str, Any]) -> None:
        if isinstance(st["store"], str):
            st = {**st, "store": FeatureStore.open(st["store"])}
        self.__dict__.update(st)

    def groups(self) -> np.ndarray | None:
        """Groups from the stored image paths (:func:`group_key`); None for in-memory stores."""
        images = getattr(self.store, "images", None)
        return path_groups(images[:self._n]) if isinstance(images, list) else None

    def labels(self) -> np.ndarray | None:
        """The store's labels (None when all unknown)."""
        lab = self.store.labels
        return None if lab is None else np.asarray(lab, np.int64)[:self._n]

    def heads(self) -> dict[str, Head]:
        """The store's heads (background rows stripped)."""
        return {m: self.store.head(m) for m in self._names}

    def arrays(self) -> Mapping[str, Any]:
        """Memory-mapped features, cut to :attr:`n` rows."""
        return {m: self.store.features(m)[:self._n] for m in self._names}

    def describe(self) -> dict[str, Any]:
        """The store's path and data description."""
        path = getattr(self.store, "path", None)
        manifest = getattr(self.store, "manifest", {})
        return {"kind": "feature-store",
                "path": str(Path(path).resolve()) if path is not None else None,
                "n": self._n, "data": manifest.get("data")}

    def specs(self) -> dict[str, dict[str, Any]]:
        """The specs the store was extracted with."""
        return {m: self.store.spec(m) for m in self._names}

    def identity(self) -> None:
        """Stores are read in one go, not checkpointed."""
        return


class ImageSource:
    """Images run through every network, each decoded once; networks opened on first use."""

    def __init__(self, data: str | os.PathLike | DataSource, models: str | Sequence[str] | None,
                 images: ImageOptions | None = None, max_images: int | None = None) -> None:
        self._names = parse_models(parse_names(models) or [])
        self._data = data
        self.options = images or ImageOptions()
        self._max_images = max_images

    @property
    def names(self) -> list[str]:
        """Canonical registry names, in joint-vector order."""
        return self._names

    @cached_property
    def data(self) -> DataSource:
        """The samples (read on first use)."""
        o = self.options
        return load_data(self._data, o.labels, o.meta, self._max_images)

    @cached_property
    def networks(self) -> list[Network]:
        """The opened backbones (exported on first use)."""
        o = self.options
        nets = open_networks(self._names, provider=o.provider, export_root=o.export_root,
                             random_weights=o.random_weights)
        for net in nets:  # on a cluster worker: the driver's exports, or one line
            want = getattr(self, "_exports", {}).get(net.name)
            if want is not None and net.onnx_sha256 != want:
                raise AffeqError(
                    f"worker on {os.uname().nodename} has another export of {net.name} "
                    f"({net.export_dir}) than the driver", "use one shared --export-root, or "
                    "copy the driver's export folder to every node")
        return nets

    @cached_property
    def _description(self) -> dict[str, Any]:
        return self.data.describe()

    @cached_property
    def device(self) -> str:
        """Where the networks run: ``cuda`` when a session runs on CUDA or TensorRT, else
        ``cpu`` (the loader decodes for it: ``fast`` is ``nvjpeg`` on a GPU where it loads)."""
        return device_of_providers([net.session.provider for net in self.networks])

    @cached_property
    def pipeline(self) -> str:
        """The concrete preprocessing pipeline: ``options.pipeline`` resolved for ``device``."""
        return resolve_pipeline(self.options.pipeline, self.device)

    @property
    def n(self) -> int:
        """Images, readable or not."""
        return len(self.data)

    def dims(self) -> dict[str, int]:
        """Feature width per model."""
        return {net.name: net.dim for net in self.networks}

    @property
    def grain(self) -> int:
        """The batch size: one chunk per batch."""
        return int(self.options.batch_size)

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        """One chunk per batch of the decode-once loader; unreadable images have no row."""
        nets, o = self.networks, self.options
        samples = self.data.samples if stop is None else self.data.samples[:stop]
        for batch, feats in feature_batches(nets, samples, o.batch_size, o.workers, start,
                                            self.pipeline, self.device):
            yield Chunk(batch.start, batch.stop, {m: feats[m] for m in self._names}, batch.ok,
                        [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a cluster worker: the samples and options, not the open sessions; the
        worker opens its own networks and refuses exports other than these."""
        return {"names": self._names, "data": self.data, "options": self.options,
                "max_images": self._max_images,
                "exports": {net.name: net.onnx_sha256 for net in self.networks}}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self._names, self.options = st["names"], st["options"]
        self._data = self.__dict__["data"] = st["data"]
        self._max_images = st["max_images"]
        self._exports = st["exports"]

    def groups(self) -> np.ndarray | None:
        """Groups from the image paths (:func:`group_key`)."""
        return path_groups([smp.path for smp in self.data.samples])

    def labels(self) -> np.ndarray | None:
        """The images' labels (None when all unknown)."""
        lab = np.array([smp.label for smp in self.data.samples], np.int64)
        return None if (lab < 0).all() else lab

    def heads(self) -> dict[str, Head]:
        """Each network's classifier (background rows stripped)."""
        return {net.name: net.head for net in self.networks}

    def arrays(self) -> None:
        """Images are streamed, not addressable."""
        return

    def describe(self) -> dict[str, Any]:
        """The data description (kind, root, count, fingerprint)."""
        return self._description

    def specs(self) -> dict[str, dict[str, Any]]:
        """The specs of the exports used."""
        return {net.name: spec_dict(net.spec) for net in self.networks}

    def identity(self) -> dict[str, Any]:
        """Models, their exports, the data and the batch grid (holdout/seed added by ``fit``)."""
        return {"models": self._names,
                "exports": {net.name: net.onnx_sha256 for net in self.networks},
                "data": self._description, "batch_size": self.options.batch_size,
                "pipeline": self.pipeline}


def row_source(source: Any, models: str | Sequence[str] | None = None,
               images: ImageOptions | None = None, max_images: int | None = None) -> RowSource:
    """A :class:`RowSource` for ``source``: a RowSource as is; ``{model: [n, d]}`` arrays; a
    FeatureStore (or anything with its reading protocol) or a store folder; else an image folder,
    list file or ``DataSource``."""
    if isinstance(source, RowSource):
        return source
    if isinstance(source, Mapping):
        return ArraySource(source, models, max_images)
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "manifest.json").is_file():
        return StoreSource(FeatureStore.open(source), models, max_images)
    if isinstance(source, (str, os.PathLike, DataSource)):
        return ImageSource(source, models, images, max_images)
    if all(hasattr(source, a) for a in ("features", "head", "models", "n")):
        return StoreSource(source, models, max_images)
    raise AffeqError(f"cannot fit maps from a {type(source).__name__}",
                     "pass feature arrays, a feature store or an image folder")
