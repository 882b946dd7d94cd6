"""affeq-rt: affine feature equivalence between pretrained networks, as an inference toolkit.

The public Python API; it mirrors the command line (``affeq-rt COMMAND`` ↔ ``affeq_rt.COMMAND``):

>>> import affeq_rt as ar
>>> ar.export("efficientnet_lite0")                                    # affeq-rt export
>>> ar.hybrid("efficientnet_lite0", "mobilenet_v2", out="hybrid.onnx")   # affeq-rt build-hybrid
>>> ar.predict("efficientnet_lite0", ["chelsea.jpg"]).results[0].names[0]  # affeq-rt predict
>>> res = ar.fit("photos/", ["efficientnet_lite0", "mobilenet_v2"], "ols")  # affeq-rt fit
>>> table = ar.evaluate("val-store", res.maps)                         # affeq-rt evaluate
>>> ar.write_report(table, "report/")
>>> ar.extract(["efficientnet_lite0", "mobilenet_v2"], "photos/", "st",
...            options=ar.ExtractOptions(stages=True))                # affeq-rt extract --stages
>>> ar.depth("st", "efficientnet_lite0", "mobilenet_v2").curves[0].points  # affeq-rt depth

Long calls take ``progress=`` (any :class:`Progress`; None is silent). User errors raise
:class:`AffeqError` (one line: the problem and the fix). The compiled core is ``affeq_rt._core``.

Names load on first use (PEP 562): ``import affeq_rt`` imports none of the library, so the
command line and a notebook start fast; ``affeq_rt.X`` and ``from affeq_rt import X`` work
as if every name had been imported here.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

import affeq_rt.cli.signals  # noqa: F401 - first: a Ctrl-C while the CLI loads is one line
from affeq_rt._version import __version__
from affeq_rt.errors import AffeqError, InternalError

if TYPE_CHECKING:
    from affeq_rt.cluster import RayExecutor
    from affeq_rt.core import GramAccumulator, backends, evaluate_heads, resolve_device
    from affeq_rt.deploy.from_names import FitOn, hybrid
    from affeq_rt.deploy.hybrid import HybridOptions, build_hybrid
    from affeq_rt.deploy.metadata import read_metadata as inspect
    from affeq_rt.deploy.predict import predict
    from affeq_rt.deploy.serve import serve
    from affeq_rt.io.heads import Head
    from affeq_rt.io.maps import AffineMap, MapSet, load_maps, save_maps
    from affeq_rt.io.store import FeatureStore
    from affeq_rt.method.depth import LayerAnalysis
    from affeq_rt.method.depth import layer_analysis as depth
    from affeq_rt.method.evaluate import evaluate, validate
    from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
    from affeq_rt.method.fit import FitOptions, FitResult, fit
    from affeq_rt.method.results import EvalTable
    from affeq_rt.method.similarity import similarity
    from affeq_rt.onnx.export import export_backbone as export
    from affeq_rt.onnx.exported import ExportedBackbone
    from affeq_rt.onnx.runtime import create_session
    from affeq_rt.progress import Progress
    from affeq_rt.registry.spec import BackboneSpec, get_spec, list_specs
    from affeq_rt.report.write import write_report
    from affeq_rt.vis.ablate import AblateOptions, ablate
    from affeq_rt.vis.cam import cam
    from affeq_rt.vis.layers import layers

#: public name -> (module, attribute): what ``from module import attribute`` gives (the
#: TYPE_CHECKING block above, for type checkers; tests/test_startup.py keeps the two equal).
_LAZY: dict[str, tuple[str, str]] = {
    "RayExecutor": ("affeq_rt.cluster", "RayExecutor"),
    "GramAccumulator": ("affeq_rt.core", "GramAccumulator"),
    "backends": ("affeq_rt.core", "backends"),
    "evaluate_heads": ("affeq_rt.core", "evaluate_heads"),
    "resolve_device": ("affeq_rt.core", "resolve_device"),
    "hybrid": ("affeq_rt.deploy.from_names", "hybrid"),
    "FitOn": ("affeq_rt.deploy.from_names", "FitOn"),
    "HybridOptions": ("affeq_rt.deploy.hybrid", "HybridOptions"),
    "build_hybrid": ("affeq_rt.deploy.hybrid", "build_hybrid"),
    "inspect": ("affeq_rt.deploy.metadata", "read_metadata"),
    "predict": ("affeq_rt.deploy.predict", "predict"),
    "serve": ("affeq_rt.deploy.serve", "serve"),
    "Head": ("affeq_rt.io.heads", "Head"),
    "AffineMap": ("affeq_rt.io.maps", "AffineMap"),
    "MapSet": ("affeq_rt.io.maps", "MapSet"),
    "load_maps": ("affeq_rt.io.maps", "load_maps"),
    "save_maps": ("affeq_rt.io.maps", "save_maps"),
    "FeatureStore": ("affeq_rt.io.store", "FeatureStore"),
    "LayerAnalysis": ("affeq_rt.method.depth", "LayerAnalysis"),
    "depth": ("affeq_rt.method.depth", "layer_analysis"),
    "evaluate": ("affeq_rt.method.evaluate", "evaluate"),
    "validate": ("affeq_rt.method.evaluate", "validate"),
    "ImageOptions": ("affeq_rt.method.extract", "ImageOptions"),
    "ExtractOptions": ("affeq_rt.method.extract", "ExtractOptions"),
    "extract": ("affeq_rt.method.extract", "extract"),
    "FitOptions": ("affeq_rt.method.fit", "FitOptions"),
    "FitResult": ("affeq_rt.method.fit", "FitResult"),
    "fit": ("affeq_rt.method.fit", "fit"),
    "EvalTable": ("affeq_rt.method.results", "EvalTable"),
    "similarity": ("affeq_rt.method.similarity", "similarity"),
    "export": ("affeq_rt.onnx.export", "export_backbone"),
    "ExportedBackbone": ("affeq_rt.onnx.exported", "ExportedBackbone"),
    "create_session": ("affeq_rt.onnx.runtime", "create_session"),
    "Progress": ("affeq_rt.progress", "Progress"),
    "BackboneSpec": ("affeq_rt.registry.spec", "BackboneSpec"),
    "get_spec": ("affeq_rt.registry.spec", "get_spec"),
    "list_specs": ("affeq_rt.registry.spec", "list_specs"),
    "write_report": ("affeq_rt.report.write", "write_report"),
    "AblateOptions": ("affeq_rt.vis.ablate", "AblateOptions"),
    "ablate": ("affeq_rt.vis.ablate", "ablate"),
    "cam": ("affeq_rt.vis.cam", "cam"),
    "layers": ("affeq_rt.vis.layers", "layers"),
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use (then it is a plain module attribute); an unimported
    subpackage (``affeq_rt.io``) loads as ``import affeq_rt.io`` would."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Every public name, loaded or not (tab completion, ``dir(affeq_rt)``)."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AblateOptions",
    "AffeqError",
    "AffineMap",
    "BackboneSpec",
    "EvalTable",
    "ExportedBackbone",
    "ExtractOptions",
    "FeatureStore",
    "FitOn",
    "FitOptions",
    "FitResult",
    "GramAccumulator",
    "Head",
    "HybridOptions",
    "ImageOptions",
    "InternalError",
    "LayerAnalysis",
    "MapSet",
    "Progress",
    "RayExecutor",
    "__version__",
    "ablate",
    "backends",
    "build_hybrid",
    "cam",
    "create_session",
    "depth",
    "evaluate",
    "evaluate_heads",
    "export",
    "extract",
    "fit",
    "get_spec",
    "hybrid",
    "inspect",
    "layers",
    "list_specs",
    "load_maps",
    "predict",
    "resolve_device",
    "save_maps",
    "serve",
    "similarity",
    "validate",
    "write_report",
]
