"""Backbone registry: one JSON spec per network in ``models/``, resolved by name or alias, then any
timm/torchvision classifier resolved from its library's metadata (``registry.resolve``).

A spec says which timm/torchvision architecture to build, where its weights come from,
how to preprocess images for it, and how faithful it is to the network the thesis used.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from affeq_rt.errors import AffeqError
from affeq_rt.registry.resolve import library_names, other_labels_default, resolve_library_name

LIBRARIES = ("timm", "torchvision", "affeq")
WEIGHT_KINDS = ("hub", "package", "file", "none")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


@contextmanager
def json_fields(source: str, fmt: str) -> Iterator[None]:
    """Turn a missing or malformed field of a JSON form read inside the block into one
    AffeqError naming ``source`` and pointing at ``fmt`` in docs/ARCHITECTURE.md."""
    try:
        yield
    except KeyError as e:
        raise AffeqError(f"{source} lacks the field {e.args[0]!r}",
                         f"see {fmt} in docs/ARCHITECTURE.md") from None
    except (TypeError, ValueError) as e:
        raise AffeqError(f"{source} has a malformed field ({e})",
                         f"see {fmt} in docs/ARCHITECTURE.md") from None


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from.

    ``kind``: ``hub`` (``hub`` = ``timm/<arch>.<tag>`` or ``torchvision/<Enum>.<member>``, read
    from the local hub cache only), ``package`` (``package`` = an installed Python package,
    ``file`` = path inside it), ``file`` (``file`` = a local path), ``none`` (random init only).
    ``adapter`` names a key adapter in ``weights.ADAPTERS`` applied before strict loading.
    """

    kind: str = "none"
    hub: str | None = None
    package: str | None = None
    file: str | None = None
    adapter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, without empty fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Preprocessing:
    """A backbone's evaluation preprocessing (timm's eval transform): resize the short side to
    ``floor(input_size / crop_pct)``, centre-crop ``input_size``², scale to [0, 1], then
    ``(x − mean) / std``.

    Hashable: images decoded once are prepared once per distinct ``Preprocessing``.
    """

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessing",
                  fix: str = "fix the spec file") -> Preprocessing:
        """From a JSON form with ``input_size``, ``crop_pct``, ``interpolation``, ``mean``,
        ``std`` (a registry spec, a hybrid's metadata); AffeqError names a bad field."""
        with json_fields(source, "the formats"):
            p = cls(int(d["input_size"]), float(d["crop_pct"]), str(d["interpolation"]),
                    tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))
        p.validate(source, fix)
        return p

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the same keys as in a registry spec)."""
        return {"input_size": self.input_size, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std)}

    def validate(self, source: str = "preprocessing", fix: str = "fix the spec file") -> None:
        """Check ranges, enumerations and that every number is finite (JSON's ``NaN`` and
        ``Infinity`` parse, and a NaN passes every comparison's negation); raise AffeqError
        naming the field. The one place a preprocessing is checked (registry specs, library
        metadata, a hybrid's record)."""
        bad = [f"{name} {list(v) if isinstance(v, tuple) else v}"
               for name, v in (("mean", self.mean), ("std", self.std),
                               ("crop_pct", self.crop_pct))
               if not all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,)))]
        if bad:
            raise AffeqError(f"{source}: {' and '.join(bad)} must be finite numbers", fix)
        checks = [
            (self.interpolation in INTERPOLATIONS,
             f"interpolation {self.interpolation!r} not in {INTERPOLATIONS}"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values"),
            (all(s > 0 for s in self.std), "std values must be positive"),
            (0.0 < self.crop_pct <= 1.0, f"crop_pct {self.crop_pct} not in (0, 1]"),
            (self.input_size > 0, "input_size must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise AffeqError(f"{source}: {msg}", fix)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: architecture, weights, preprocessing, feature/label layout, fidelity note."""

    name: str
    library: str
    arch: str
    weights: WeightsSource
    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    num_classes: int = 1000
    label_offset: int = 0
    aliases: tuple[str, ...] = ()
    paper_name: str | None = None
    expected_top1: float | None = None
    tags: tuple[str, ...] = ()
    note: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "spec") -> BackboneSpec:
        """Build and validate a spec from its JSON form; AffeqError names the bad field."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        with json_fields(source, "the registry format"):
            w = d.get("weights") or {"kind": "none"}
            weights = WeightsSource(**w)
            spec = cls(
                name=str(d["name"]), library=str(d["library"]), arch=str(d["arch"]),
                weights=weights, input_size=int(d["input_size"]), crop_pct=float(d["crop_pct"]),
                interpolation=str(d["interpolation"]),
                mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                feature_dim=int(d["feature_dim"]), num_classes=int(d.get("num_classes", 1000)),
                label_offset=int(d.get("label_offset", 0)),
                aliases=tuple(str(a) for a in d.get("aliases", ())),
                paper_name=d.get("paper_name"),
                expected_top1=None if d.get("expected_top1") is None else float(d["expected_top1"]),
                tags=tuple(str(t) for t in d.get("tags", ())), note=str(d.get("note", "")),
                extra={k: v for k, v in d.items() if k not in known},
            )
        spec.validate(source)
        return spec

    def validate(self, source: str = "spec") -> None:
        """Check enumerations and shapes; raise AffeqError naming the field."""
        w = self.weights
        self.preprocessing.validate(source)
        checks = [
            (self.library in LIBRARIES, f"library {self.library!r} not in {LIBRARIES}"),
            (w.kind in WEIGHT_KINDS, f"weights.kind {w.kind!r} not in {WEIGHT_KINDS}"),
            (w.kind != "hub" or bool(w.hub), "weights.kind hub needs weights.hub"),
            (w.kind != "package" or bool(w.package and w.file),
             "weights.kind package needs weights.package and weights.file"),
            (w.kind != "file" or bool(w.file), "weights.kind file needs weights.file"),
            (self.feature_dim > 0 and self.num_classes > 0,
             "feature_dim and num_classes must be positive"),
            (0 <= self.label_offset < self.num_classes,
             "label_offset must be >= 0 and below num_classes"),
        ]
        for ok, msg in checks:
            if not ok:
                raise AffeqError(f"{source}: {msg}", "fix the spec file")

    @property
    def preprocessing(self) -> Preprocessing:
        """This backbone's evaluation preprocessing."""
        return Preprocessing(self.input_size, self.crop_pct, self.interpolation, self.mean,
                             self.std)

    def to_dict(self) -> dict[str, Any]:
        """The registry JSON form (round-trips through ``from_dict``); used only at file edges
        (registry files, export manifests, store manifests, hybrid metadata)."""
        d: dict[str, Any] = {
            "name": self.name, "aliases": list(self.aliases), "paper_name": self.paper_name,
            "library": self.library, "arch": self.arch, "weights": self.weights.to_dict(),
            "input_size": self.input_size, "crop_pct": self.crop_pct,
            "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
            "feature_dim": self.feature_dim, "num_classes": self.num_classes,
            "label_offset": self.label_offset, "expected_top1": self.expected_top1,
            "tags": list(self.tags), "note": self.note,
        }
        d.update(self.extra)
        return d


def models_dir(package: Path | None = None) -> Path:
    """Folder holding the spec files, first found of: ``$AFFEQ_RT_MODELS``; the installed
    ``affeq_rt/models/`` (a wheel or ``pip install .``); the checkout's top-level ``models/``
    (an editable install, whose ``affeq_rt/`` is the checkout's). ``package`` (the ``affeq_rt``
    folder, default this one) is a parameter for tests."""
    env = os.environ.get("AFFEQ_RT_MODELS")
    if env:
        return Path(env)
    package = package or Path(__file__).resolve().parents[1]
    installed = package / "models"
    if installed.is_dir():
        return installed
    checkout = package.parent
    # Only a real checkout: an installed package's parent is site-packages, where a foreign
    # `models/` folder may lie.
    if (checkout / "pyproject.toml").is_file() and (checkout / "models").is_dir():
        return checkout / "models"
    return installed


@lru_cache(maxsize=4)
def _load_all(folder: str) -> dict[str, BackboneSpec]:
    specs: dict[str, BackboneSpec] = {}
    root = Path(folder)
    if not root.is_dir():
        raise AffeqError(f"registry folder {root} does not exist",
                         "run from a checkout with models/ or set AFFEQ_RT_MODELS")
    for path in sorted(root.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AffeqError(f"registry spec {path} is corrupt ({e})",
                             "fix or remove the file") from None
        spec = BackboneSpec.from_dict(data, source=str(path))
        if spec.name in specs:
            raise AffeqError(f"registry spec {path} repeats the name {spec.name!r}", "rename one")
        specs[spec.name] = spec
    return specs


def _index(specs: Mapping[str, BackboneSpec]) -> dict[str, str]:
    idx: dict[str, str] = {}
    for spec in specs.values():
        for key in (spec.name, *spec.aliases):
            k = _norm(key)
            if k in idx and idx[k] != spec.name:
                raise AffeqError(f"registry alias {key!r} names both {idx[k]} and {spec.name}",
                                 "make aliases unique")
            idx[k] = spec.name
    return idx


def _norm(name: str) -> str:
    return name.strip().lower()


def list_specs(tag: str | None = None) -> list[BackboneSpec]:
    """Every registered backbone (sorted by name), optionally only those carrying ``tag``."""
    specs = _load_all(str(models_dir()))
    out = sorted(specs.values(), key=lambda s: s.name)
    if tag is not None and not any(tag in s.tags for s in out):
        tags = sorted({t for s in out for t in s.tags})
        raise AffeqError(f"no registered model has the tag {tag!r}",
                         f"use one of {', '.join(tags)} or leave --tag out")
    return [s for s in out if tag is None or tag in s.tags]


def get_spec(name: str, allow_other_labels: bool | None = None) -> BackboneSpec:
    """Resolve a name: a curated spec's name or alias first (case-insensitive), else any timm
    model (``arch`` or ``arch.tag``) or torchvision classifier (``torchvision/resnet50[.WEIGHTS]``,
    ``tv_resnet50``) from the library's own metadata (``registry.resolve``). Unknown names list
    the closest ones among curated and library names.

    ``allow_other_labels`` (None: ``$AFFEQ_RT_OTHER_LABELS``) is agreement mode: heads over other
    label sets than ImageNet-1k are accepted instead of refused."""
    specs = _load_all(str(models_dir()))
    idx = _index(specs)
    key = _norm(name)
    if key in idx:
        return specs[idx[key]]
    other = other_labels_default() if allow_other_labels is None else allow_other_labels
    resolved = resolve_library_name(name.strip(), other)
    if resolved is not None:
        return BackboneSpec.from_dict(resolved, source=f"{resolved['resolved_from']} metadata "
                                                       f"of {name.strip()!r}")
    pool = {k: k for k in library_names()} | idx
    close = difflib.get_close_matches(key, list(pool), n=5, cutoff=0.5)
    suggestions = [c if c == _norm(pool[c]) else f"{c} (= {pool[c]})" for c in close]
    hint = (f"closest: {', '.join(suggestions)}" if suggestions
            else "run `affeq-rt models --all PATTERN` for the names")
    raise AffeqError(f"unknown model {name!r}", hint)
