"""affeq-rt: affine feature equivalence between pretrained networks, as an inference toolkit.

The public Python API; it mirrors the command line (``affeq-rt COMMAND`` ↔ ``affeq_rt.COMMAND``):

>>> import affeq_rt as ar
>>> ar.export("efficientnet_lite0")                                    # affeq-rt export
>>> ar.hybrid("efficientnet_lite0", "mobilenet_v2", out="hybrid.onnx")   # affeq-rt build-hybrid
>>> ar.predict("efficientnet_lite0", ["chelsea.jpg"]).results[0].names[0]  # affeq-rt predict
>>> res = ar.fit("photos/", ["efficientnet_lite0", "mobilenet_v2"], "ols")  # affeq-rt fit
>>> table = ar.evaluate("val-store", res.maps)                         # affeq-rt evaluate
>>> ar.write_report(table, "report/")
>>> ar.extract(["efficientnet_lite0", "mobilenet_v2"], "photos/", "st", stages=True)  # --stages
>>> ar.depth("st", "efficientnet_lite0", "mobilenet_v2").curves[0].points  # affeq-rt depth

Long calls take ``progress=`` (any :class:`Progress`; None is silent). User errors raise
:class:`AffeqError` (one line: the problem and the fix). The compiled core is ``affeq_rt._core``.
"""

from __future__ import annotations

import affeq_rt.cli.signals  # noqa: F401 - first: a Ctrl-C while the CLI loads is one line
from affeq_rt._version import __version__
from affeq_rt.cluster import RayExecutor
from affeq_rt.core import GramAccumulator, backends, evaluate_heads, resolve_device
from affeq_rt.deploy.from_names import hybrid
from affeq_rt.deploy.hybrid import HybridOptions, build_hybrid
from affeq_rt.deploy.metadata import read_metadata as inspect
from affeq_rt.deploy.predict import predict
from affeq_rt.deploy.serve import serve
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, MapSet, load_maps, save_maps
from affeq_rt.io.store import FeatureStore
from affeq_rt.method.depth import LayerAnalysis
from affeq_rt.method.depth import layer_analysis as depth
from affeq_rt.method.evaluate import evaluate, validate
from affeq_rt.method.extract import ImageOptions, extract
from affeq_rt.method.fit import FitOptions, FitResult, fit
from affeq_rt.method.results import EvalTable
from affeq_rt.method.similarity import similarity
from affeq_rt.onnx.export import export_backbone as export
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.progress import Progress
from affeq_rt.registry.spec import BackboneSpec, get_spec, list_specs
from affeq_rt.report.write import write_report
from affeq_rt.vis.ablate import ablate
from affeq_rt.vis.cam import cam
from affeq_rt.vis.layers import layers

__all__ = [
    "AffeqError",
    "AffineMap",
    "BackboneSpec",
    "EvalTable",
    "ExportedBackbone",
    "FeatureStore",
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
