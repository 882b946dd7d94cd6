"""Stage features as rows: every network's pooled stages (``onnx.stages``) from images decoded once.

:class:`StageSource` is an image row source whose "models" are, per network ``NAME``, its stages
``NAME@s1`` … ``NAME@sK`` (shallow to deep) and then ``NAME`` itself (the classifier's input), all
from one run of the network's ``stages.onnx`` per batch. ``ExtractOptions(stages=True)`` writes them
into an ordinary feature store (one array per stage), so the store, ``StoreSource``, the Gram
reducer and the similarity code treat each stage as a network of its own. A stage has no
classifier: its head file is zero and its spec says ``stage_of`` (the network) and ``stage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from affeq_rt.data.loader import iter_batches
from affeq_rt.engine.reducer import Chunk
from affeq_rt.io.fsio import sha256_file
from affeq_rt.io.heads import Head, load_head
from affeq_rt.method.images import spec_dict
from affeq_rt.method.rows import ImageSource
from affeq_rt.onnx.stages import Stage, StagesModel, ensure_stages, stage_model


def stage_of(spec: dict[str, Any]) -> str | None:
    """The network a stored "model" is a stage of (from its spec), or None for a network."""
    v = spec.get("stage_of")
    return str(v) if v else None


def network_models(models: list[str], specs: dict[str, dict[str, Any]], network: str
                   ) -> list[str]:
    """A network's models in a store, shallow to deep: its stages in stage order, then itself."""
    stages = [m for m in models if stage_of(specs[m]) == network]
    stages.sort(key=lambda m: int(specs[m]["stage"]["name"][1:]))
    return [*stages, network] if network in models else stages


def stage_spec(base: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """The store spec of one stage of the network whose spec is ``base``."""
    name = stage_model(base["name"], stage.name)
    return {**base, "name": name, "aliases": [], "feature_dim": stage.dim,
            "stage_of": base["name"], "stage": stage.to_dict(),
            "note": f"stage {stage.name} of {base['name']}: {stage.module} pooled "
                    f"({stage.pool}); no classifier of its own (zero head)"}


class StageSource(ImageSource):
    """Images run through every network's ``stages.onnx``, each image decoded once."""

    @cached_property
    def stage_models(self) -> list[StagesModel]:
        """Each network's opened ``stages.onnx`` (built on first use)."""
        return [ensure_stages(net.export_dir, self.options.provider) for net in self.networks]

    @property
    def names(self) -> list[str]:
        """Per network: ``NAME@s1`` … ``NAME@sK``, then ``NAME``."""
        out = []
        for net, sm in zip(self.networks, self.stage_models, strict=True):
            out += [stage_model(net.name, s.name) for s in sm.stages] + [net.name]
        return out

    def dims(self) -> dict[str, int]:
        """Width of every stage and network."""
        out = {}
        for net, sm in zip(self.networks, self.stage_models, strict=True):
            out.update({stage_model(net.name, s.name): s.dim for s in sm.stages})
            out[net.name] = net.dim
        return out

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        """One chunk per batch of the decode-once loader; unreadable images have no row."""
        nets, o = self.networks, self.options
        samples = self.data.samples if stop is None else self.data.samples[:stop]
        if start >= len(samples):
            return
        for batch in iter_batches(samples, [n.spec for n in nets], batch_size=o.batch_size,
                                  workers=o.workers, start=start, pipeline=self.pipeline,
                                  device=self.device):
            cols: dict[str, np.ndarray] = {}
            for net, sm in zip(nets, self.stage_models, strict=True):
                got = sm.run(batch.tensors[net.key])
                for s in sm.stages:
                    cols[stage_model(net.name, s.name)] = got[s.name]
                cols[net.name] = (got["features"] if got["features"].size
                                  else np.zeros((0, net.dim), np.float32))
            yield Chunk(batch.start, batch.stop, {m: cols[m] for m in self.names}, batch.ok,
                        [{"index": i, "path": p, "reason": r} for i, p, r in batch.skipped])

    def heads(self) -> dict[str, Head]:
        """Networks: their classifiers. Stages have none; their zero heads stand in."""
        return {m: Head(w, b) for m, (w, b) in self.head_files().items()}

    def head_files(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What each store folder's ``head.safetensors`` holds: the export's head for a
        network, zeros of the stage's width for a stage."""
        out = {}
        for net, sm in zip(self.networks, self.stage_models, strict=True):
            w, b = load_head(net.head_path)
            for s in sm.stages:
                out[stage_model(net.name, s.name)] = (np.zeros((w.shape[0], s.dim), np.float32),
                                                      np.zeros(w.shape[0], np.float32))
            out[net.name] = (w, b)
        return out

    def specs(self) -> dict[str, dict[str, Any]]:
        """The network's spec; a stage's says which network and stage it is."""
        out = {}
        for net, sm in zip(self.networks, self.stage_models, strict=True):
            base = spec_dict(net.spec)
            out.update({stage_model(net.name, s.name): stage_spec(base, s) for s in sm.stages})
            out[net.name] = base
        return out

    def exports(self) -> dict[str, str]:
        """SHA-256 of the graph each model's rows come from (``stages.onnx``)."""
        out = {}
        for net, sm in zip(self.networks, self.stage_models, strict=True):
            digest = sha256_file(sm.path)
            out.update({m: digest for m in [stage_model(net.name, s.name) for s in sm.stages]})
            out[net.name] = digest
        return out

    def identity(self) -> dict[str, Any]:
        """As an image source's, over the stage graphs."""
        return {**super().identity(), "models": self.names, "exports": self.exports()}
