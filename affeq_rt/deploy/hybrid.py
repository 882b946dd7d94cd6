"""Hybrid models for deployment: A's feature graph + B's classifier with the affine map folded in.

``build_hybrid(src, dst, maps=… | fit_on=…, out=…)`` writes ONE ONNX file computing
``softmax(W_B (M F_A(x) + m) + c_B)``: A's exported ``features.onnx`` (every name prefixed ``a/``)
followed by one Gemm whose weights ``W_B·M`` and bias ``W_B·m + c_B`` are folded in float64. It has
the named outputs ``logits`` and ``probabilities``, a dynamic batch dimension, and metadata
(``metadata_props``, keys ``affeq_rt.*``) saying how it was made. Before the file appears it is run
on real photographs and checked against ``C_B(M·F_A(x))`` computed from the separate parts.

Input layouts:
  * default: ``image`` float32 ``[N, 3, S, S]``, already preprocessed (``preprocess.preprocess``);
  * ``with_preprocessing=True``: ``image`` uint8 ``[N, S, S, 3]`` (NHWC, RGB, resized and centre-
    cropped to S = A's input size, as decoded images usually are); the graph does A's
    ``/255 − mean ÷ std`` and the NHWC→NCHW transpose itself, in the same float32 order as
    ``preprocess.normalize``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import jsonable

if TYPE_CHECKING:  # pragma: no cover
    import onnx

META_PREFIX = "affeq_rt."
INPUT_NAME = "image"
OUTPUTS = ("logits", "probabilities")
MIN_OPSET = 13  # Softmax(axis=1) on [N, K] means the same at every opset ≥ 13
TWO_GB = 2**31 - 1
# fp32: the fold changes the float32 summation order (W_B·M is summed in float64 and rounded once,
# the parts round M·F and then W_B·(·)); relative to the largest logit that moves results by
# ~1e-6 for well-conditioned maps and up to ~1e-5 for min-norm maps with large weights.
TOL_FP32 = 1e-4
# fp16: weights and activations carry an 11-bit mantissa (2^-11 ≈ 5e-4 per rounding) through a deep
# network; errors of 1-3 % of the largest logit are normal, so top-1 agreement is what is checked:
# on every image whose reference top-1/top-2 margin exceeds TOP1_MARGIN of the logit scale (closer
# calls are near-ties that fp16 rounding may legitimately reorder).
TOL_FP16 = 5e-2
TOP1_MARGIN = 1e-2
VERIFY_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry",
                 "hubble_deep_field", "colorwheel", "camera", "coins", "moon", "clock", "text")


@dataclass
class Verification:
    """Outcome of checking the hybrid against its separate parts."""

    max_rel: float
    tolerance: float
    images: list[str]
    top1_agree: int
    top1_checked: int
    fp16: bool
    provider: str = "CPUExecutionProvider"

    @property
    def passed(self) -> bool:
        """Within tolerance and (fp16) top-1 agreement on every clear-margin image."""
        return self.max_rel <= self.tolerance and self.top1_agree == self.top1_checked

    def to_dict(self) -> dict[str, Any]:
        """JSON form for metadata."""
        return {"max_rel": self.max_rel, "tolerance": self.tolerance, "n_images": len(self.images),
                "images": self.images, "top1_agree": self.top1_agree,
                "top1_checked": self.top1_checked, "fp16": self.fp16, "provider": self.provider}


# ----------------------------------------------------------------------------------- ONNX pieces

def _onnx():
    import onnx

    return onnx


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise AffeqError("the features model imports no default ONNX opset", "re-export the backbone")


def _real_inputs(graph: Any) -> list[Any]:
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _dims(vi: Any) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def check_features_model(model: onnx.ModelProto, d_src: int, input_size: int,
                         what: str = "features.onnx") -> str:
    """Check A's features graph: one float image input, one [N, d] output; return the batch name."""
    onnx = _onnx()
    g = model.graph
    ins, outs = _real_inputs(g), list(g.output)
    if len(ins) != 1 or len(outs) != 1:
        raise AffeqError(f"{what} has {len(ins)} inputs and {len(outs)} outputs, expected 1 and 1",
                         "re-export the backbone with affeq-rt export")
    fl = onnx.TensorProto.FLOAT
    if ins[0].type.tensor_type.elem_type != fl or outs[0].type.tensor_type.elem_type != fl:
        raise AffeqError(f"{what} is not float32 in and out", "re-export the backbone")
    di, do = _dims(ins[0]), _dims(outs[0])
    if len(di) != 4 or len(do) != 2:
        raise AffeqError(f"{what} maps rank {len(di)} to rank {len(do)}, expected [N,3,S,S]→[N,d]",
                         "re-export the backbone")
    if not isinstance(di[0], str):
        raise AffeqError(f"{what} has a fixed batch size ({di[0]})",
                         "re-export it with a dynamic batch dimension")
    if isinstance(do[1], int) and do[1] != d_src:
        raise AffeqError(f"{what} gives {do[1]} features but the map expects {d_src}",
                         "use maps fitted on this backbone's features")
    if any(isinstance(s, int) and s != input_size for s in di[2:]) or di[1] not in (3, None):
        raise AffeqError(f"{what} takes {di[1:]} images, the registry says 3×{input_size}²",
                         "re-export the backbone")
    return di[0]


def _reconcile(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bring a part to an opset where our head ops mean what we want (≥ 13); keep its IR version."""
    v = _default_opset(model)
    if v >= MIN_OPSET:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises bare RuntimeErrors with adapter names
        raise AffeqError(f"cannot convert the features graph from opset {v} to {MIN_OPSET} ({e})",
                         "re-export the backbone with opset ≥ 13") from None
    converted.ir_version = max(converted.ir_version, model.ir_version)
    return converted


def _head_model(w: np.ndarray, b: np.ndarray, batch: str, opset: int, ir_version: int,
                in_name: str) -> onnx.ModelProto:
    """``features [N,d] → Gemm(W, b) → logits [N,K] → Softmax → probabilities [N,K]``."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    k, d = w.shape
    fl = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Gemm", [in_name, "head/weight", "head/bias"], [OUTPUTS[0]],
                         name="head/gemm", transB=1),
        helper.make_node("Softmax", [OUTPUTS[0]], [OUTPUTS[1]], name="head/softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info(in_name, fl, [batch, d])],
        [helper.make_tensor_value_info(OUTPUTS[0], fl, [batch, k]),
         helper.make_tensor_value_info(OUTPUTS[1], fl, [batch, k])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w, np.float32), "head/weight"),
                     numpy_helper.from_array(np.ascontiguousarray(b, np.float32), "head/bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def _preprocess_model(spec: Any, batch: str, opset: int, ir_version: int,
                      out_name: str) -> onnx.ModelProto:
    """uint8 NHWC ``image`` → float32 NCHW normalised like ``preprocess.normalize``."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    s = int(spec.input_size)
    consts = {
        "pre/scale": np.asarray(1.0 / 255.0, np.float32),
        "pre/mean": np.asarray(spec.mean, np.float32).reshape(1, 1, 1, 3),
        "pre/std": np.asarray(spec.std, np.float32).reshape(1, 1, 1, 3),
    }
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pre/float"], name="pre/cast",
                         to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["pre/float", "pre/scale"], ["pre/scaled"], name="pre/scale"),
        helper.make_node("Sub", ["pre/scaled", "pre/mean"], ["pre/centred"], name="pre/sub"),
        helper.make_node("Div", ["pre/centred", "pre/std"], ["pre/nhwc"], name="pre/div"),
        helper.make_node("Transpose", ["pre/nhwc"], [out_name], name="pre/nchw", perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes, "preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.UINT8, [batch, s, s, 3])],
        [helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, [batch, 3, s, s])],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def _merge(m1: onnx.ModelProto, m2: onnx.ModelProto,
           io_map: list[tuple[str, str]]) -> onnx.ModelProto:
    """``onnx.compose.merge_models`` after checking that no name is shared and versions agree."""
    from onnx import compose

    overlap = compose.check_overlapping_names(m1.graph, m2.graph, io_map)
    if overlap:
        raise AffeqError(f"hybrid parts share names {overlap[:3]}", "report this as a bug")
    ir = max(m1.ir_version, m2.ir_version)
    m1.ir_version = m2.ir_version = ir
    merged = compose.merge_models(m1, m2, io_map=io_map, producer_name="affeq-rt")
    opsets: dict[str, int] = {}
    for op in merged.opset_import:  # merge_models lists a shared domain once per part
        opsets[op.domain] = max(opsets.get(op.domain, 0), int(op.version))
    del merged.opset_import[:]
    for domain, version in opsets.items():
        merged.opset_import.add(domain=domain, version=version)
    return merged


def compose_hybrid(features: onnx.ModelProto, weight: np.ndarray, bias: np.ndarray, spec: Any,
                   with_preprocessing: bool = False) -> onnx.ModelProto:
    """One graph: (optional uint8 preprocessing →) A's features (prefixed ``a/``) → folded head.

    ``weight`` [K, d_src] and ``bias`` [K] are the folded head (``maps.fold_head``).
    """
    onnx = _onnx()
    from onnx import compose

    weight = np.asarray(weight)
    batch = check_features_model(features, weight.shape[1], int(spec.input_size))
    a = _reconcile(features)
    in_old = _real_inputs(a.graph)[0].name
    out_old = a.graph.output[0].name
    # Prefix every name of A's graph so nothing can collide with the head or the preprocessing.
    a = compose.add_prefix(a, "a/")
    opset = _default_opset(a)
    head = _head_model(weight, bias, batch, opset, a.ir_version, "head/features")
    model = _merge(a, head, [(f"a/{out_old}", "head/features")])
    if with_preprocessing:
        pre = _preprocess_model(spec, batch, opset, model.ir_version, "pre/image")
        model = _merge(pre, model, [("pre/image", f"a/{in_old}")])
    else:
        _rename_input(model, f"a/{in_old}", INPUT_NAME)
    model.producer_name = "affeq-rt"
    from affeq_rt._version import __version__

    model.producer_version = __version__
    del model.metadata_props[:]
    if model.ByteSize() < TWO_GB:  # past 2 GB the check runs on the saved file (_save)
        onnx.checker.check_model(model)
    return model


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for vi in g.input:
        if vi.name == old:
            vi.name = new
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def set_metadata(model: onnx.ModelProto, info: Mapping[str, Any]) -> None:
    """Replace ``affeq_rt.*`` metadata_props; non-string values are stored as JSON."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    for k, v in info.items():
        value = v if isinstance(v, str) else json.dumps(v, default=jsonable)
        model.metadata_props.add(key=META_PREFIX + k, value=value)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``affeq_rt.*`` metadata of a hybrid (JSON values decoded) plus its inputs and outputs."""
    onnx = _onnx()
    p = Path(path)
    if not p.is_file():
        raise AffeqError(f"model {p} does not exist", "check the path")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / google.protobuf errors
        raise AffeqError(f"{p} is not a readable ONNX model ({e.__class__.__name__})",
                         "pass a .onnx file written by affeq-rt build-hybrid") from None
    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(META_PREFIX):
            continue
        try:
            meta[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
        except json.JSONDecodeError:
            meta[prop.key[len(META_PREFIX):]] = prop.value
    g = model.graph
    onnx_types = {v: k for k, v in onnx.TensorProto.DataType.items()}
    io = {
        "inputs": [{"name": i.name, "type": onnx_types.get(i.type.tensor_type.elem_type, "?"),
                    "shape": _dims(i)} for i in _real_inputs(g)],
        "outputs": [{"name": o.name, "type": onnx_types.get(o.type.tensor_type.elem_type, "?"),
                     "shape": _dims(o)} for o in g.output],
        "opset": _default_opset(model), "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    return {"path": str(p), "metadata": meta, "graph": io}


# ------------------------------------------------------------------------------------- labels

def label_names(num_classes: int, label_offset: int) -> list[str]:
    """Class names for B's logits: ImageNet-1k descriptions (timm's table), ``background`` first
    for TF-slim 1001-class heads; plain indices for other heads."""
    n_imagenet = num_classes - label_offset
    if n_imagenet == 1000:
        from affeq_rt.data.labels import imagenet_names

        names = list(imagenet_names())
    else:
        names = [str(i) for i in range(n_imagenet)]
    return ["background"] * label_offset + names


# ---------------------------------------------------------------------------------- verification

def verification_inputs(
    spec: Any, names: Sequence[str] = VERIFY_PHOTOS, paths: Sequence[str | os.PathLike] = (),
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Real photos preprocessed for A: float32 [n,3,S,S], the uint8 [n,S,S,3] crops, their names.

    scikit-image's sample photos when it is installed, else ``paths`` (e.g. the fit images).
    """
    from PIL import Image

    from affeq_rt.data.preprocess import load_image, normalize, resize_crop, sample_photo, to_rgb

    imgs: list[tuple[str, Image.Image]] = []
    for n in names:
        try:
            imgs.append((n, sample_photo(n)))
        except ImportError:  # no scikit-image: fall back to ``paths``
            break
        except Exception:  # a sample that needs a download (pooch) is simply skipped
            continue
    for p in paths:
        if len(imgs) >= 8:
            break
        imgs.append((Path(p).name, load_image(p)))
    if not imgs:
        raise AffeqError("no real images to verify the hybrid on",
                         "install scikit-image (pip install 'affeq-rt[demo]') or pass --fit-on DIR")
    u8, fl = [], []
    for _, im in imgs:
        crop = np.asarray(resize_crop(to_rgb(im), int(spec.input_size), float(spec.crop_pct),
                                      str(spec.interpolation)), dtype=np.uint8)
        u8.append(crop)
        fl.append(normalize(crop, spec.mean, spec.std))
    return np.stack(fl), np.stack(u8), [n for n, _ in imgs]


def _run(path: str | os.PathLike, feed: np.ndarray) -> list[np.ndarray]:
    """Every output of the single-input ONNX model at ``path`` on ``feed`` (CPU session)."""
    from affeq_rt.onnx.runtime import create_session

    sess = create_session(path, provider="cpu")
    return sess.run_feeds({sess.input_names[0]: feed})


def reference_logits(features_path: str | os.PathLike, m_weight: np.ndarray, m_bias: np.ndarray,
                     head: tuple[np.ndarray, np.ndarray], x: np.ndarray,
                     classifier_path: str | os.PathLike | None = None) -> np.ndarray:
    """C_B(M·F_A(x)) from the separate parts: A's features session, the map in float64, then B's
    classifier (its ``classifier.onnx`` session where given, else its head arrays in float64)."""
    fa = _run(features_path, x)[0]
    mapped = (fa.astype(np.float64) @ np.asarray(m_weight, np.float64).T
              + np.asarray(m_bias, np.float64))
    if classifier_path is not None and Path(classifier_path).is_file():
        return _run(classifier_path, mapped.astype(np.float32))[0].astype(np.float64)
    w, b = head
    return mapped @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)


def verify(path: str | os.PathLike, reference: np.ndarray, feed: np.ndarray, names: list[str],
           fp16: bool) -> Verification:
    """Run the hybrid file on ``feed`` and compare its logits with ``reference`` [n, K]."""
    logits, probs = _run(path, feed)
    ref = np.asarray(reference, np.float64)
    got = np.asarray(logits, np.float64)
    if got.shape != ref.shape:
        raise AffeqError(f"hybrid gives logits {got.shape}, the parts give {ref.shape}",
                         "report this as a bug")
    scale = max(float(np.abs(ref).max()), 1e-12)
    max_rel = float(np.abs(got - ref).max() / scale)
    if not np.allclose(np.asarray(probs, np.float64).sum(1), 1.0, atol=1e-3):
        max_rel = float("inf")  # probabilities must be a softmax over the logits
    tol = TOL_FP16 if fp16 else TOL_FP32
    # Top-1 is compared wherever the reference's top-1/top-2 margin is clear (see TOP1_MARGIN).
    srt = np.sort(ref, axis=1)
    clear = (srt[:, -1] - srt[:, -2]) > min(2 * tol, TOP1_MARGIN) * scale
    agree = int((got.argmax(1) == ref.argmax(1))[clear].sum())
    return Verification(max_rel, tol, list(names), agree, int(clear.sum()), fp16)


# ----------------------------------------------------------------------------------------- build

def _resolve_map(maps: Any, src: str, dst: str, d_src: int, d_dst: int) -> Any:
    from affeq_rt.io.maps import MapSet, load_maps

    ms = maps if isinstance(maps, MapSet) else load_maps(maps)
    m = ms[(src, dst)]
    if m.weight.shape != (d_dst, d_src) or m.bias.shape != (d_dst,):
        raise AffeqError(f"map {src}->{dst} in {ms.path or 'maps'} is {m.weight.shape[0]}x"
                         f"{m.weight.shape[1]}, but {dst} has {d_dst} and {src} has {d_src} "
                         "features",
                         "fit the maps again with these backbones")
    if not (np.isfinite(m.weight).all() and np.isfinite(m.bias).all()):
        raise AffeqError(f"map {src}->{dst} has NaN/Inf entries", "fit the maps again")
    return m


def _fit_map(src: str, dst: str, fit_on: str | os.PathLike, method: str, exports_root: Any,
             random_weights: bool, holdout: float) -> Any:
    """Fit the map src→dst on the images of ``fit_on`` (one joint pass, ``fit.fit_maps``)."""
    from affeq_rt.io.maps import MapSet
    from affeq_rt.method.fit import fit_maps

    folder = Path(fit_on)
    if not folder.is_dir():
        raise AffeqError(f"--fit-on {folder} is not a folder", "pass a folder of images")
    maps = fit_maps(str(folder), [src, dst], method=method, holdout=holdout,
                    random_weights=random_weights,
                    export_root=None if exports_root is None else str(exports_root))
    return MapSet(maps, {"fit_on": str(folder)}, f"(fitted on {folder})")


def default_model_name(src: str, dst: str, fp16: bool = False) -> str:
    """Triton-safe model name ``<src>_to_<dst>[_fp16]``."""
    name = f"{src}_to_{dst}" + ("_fp16" if fp16 else "")
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def _check_out(out_path: Path, force: bool) -> None:
    if out_path.suffix != ".onnx":
        raise AffeqError(f"output {out_path} does not end in .onnx", "name the output *.onnx")
    if out_path.exists() and not force:
        raise AffeqError(f"output {out_path} already exists", "pass --force to replace it")


def build_hybrid(src: str, dst: str, maps: Any = None, fit_on: str | os.PathLike | None = None,
                 method: str = "ols", out: str | os.PathLike | None = None, fp16: bool = False,
                 with_preprocessing: bool = False, force: bool = False,
                 server_repo: str | os.PathLike | None = None, *, model_name: str | None = None,
                 exports_root: str | os.PathLike | None = None, random_weights: bool = False,
                 holdout: float = 0.1, accuracy: Any = None, tensorrt: bool = False,
                 max_batch_size: int = 32,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build, verify and write the hybrid ONNX model ``src → map → dst``; return its path.

    ``maps`` is a maps file (or ``maps.MapSet``) holding ``src->dst``; alternatively ``fit_on`` is
    an image folder the map is fitted on with ``method`` (``holdout`` of the images held out;
    ridge picks λ on them). ``server_repo`` also writes a Triton model repository. Refuses an
    existing ``out`` (or repository model folder) unless ``force``; nothing is written unless
    verification passes.
    """
    from affeq_rt.registry.spec import get_spec

    say = progress or (lambda _m: None)
    if (maps is None) == (fit_on is None):
        raise AffeqError("give exactly one of --maps FILE and --fit-on DIR",
                         "pass a maps file from affeq-rt fit, or an image folder to fit on")
    s_spec, d_spec = get_spec(src), get_spec(dst)
    src, dst = s_spec.name, d_spec.name
    name = model_name or default_model_name(src, dst, fp16)
    out_path = Path(out) if out is not None else Path(f"{name}.onnx")
    _check_out(out_path, force)
    if server_repo is not None:
        from affeq_rt.deploy.triton import check_repo_target

        check_repo_target(server_repo, name, force)

    # The map: from a file (checked against both feature widths) or fitted now.
    if maps is not None:
        amap = _resolve_map(maps, src, dst, s_spec.feature_dim, d_spec.feature_dim)
    else:
        say(f"fitting {src}->{dst} on {fit_on} ({method})")
        fitted = _fit_map(src, dst, fit_on, method, exports_root, random_weights, holdout)
        amap = _resolve_map(fitted, src, dst, s_spec.feature_dim, d_spec.feature_dim)

    say(f"exporting {src} and {dst}")
    from affeq_rt.onnx.export import ExportedBackbone, ensure_exported

    root = None if exports_root is None else Path(exports_root)
    a_exp = ExportedBackbone(ensure_exported(src, root=root, random_weights=random_weights))
    b_dir = ensure_exported(dst, root=root, random_weights=random_weights)
    b_exp = ExportedBackbone(b_dir)
    extra = {"maps_file": None if maps is None else str(getattr(maps, "path", maps)),
             "fit_on": None if fit_on is None else str(fit_on), "random_weights": random_weights}
    return build_from_parts(
        s_spec, d_spec, a_exp.features_path, b_exp.head(), amap, out_path,
        classifier_path=b_exp.classifier_path, fp16=fp16,
        with_preprocessing=with_preprocessing, force=force, server_repo=server_repo,
        model_name=name, accuracy=accuracy, tensorrt=tensorrt, max_batch_size=max_batch_size,
        extra_meta=extra, verify_images=_first_images(fit_on), progress=progress)


def _first_images(folder: str | os.PathLike | None, n: int = 8) -> list[str]:
    """Up to ``n`` image files of ``folder`` (verification fallback without scikit-image)."""
    if folder is None or not Path(folder).is_dir():
        return []
    from affeq_rt.data.readers import IMAGE_EXTS

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    return [str(p) for p in files[:n]]


def build_from_parts(a_spec: Any, b_spec: Any, features_path: str | os.PathLike,
                     head_b: tuple[np.ndarray, np.ndarray], amap: Any, out: str | os.PathLike,
                     *, classifier_path: str | os.PathLike | None = None, fp16: bool = False,
                     with_preprocessing: bool = False, force: bool = False,
                     server_repo: str | os.PathLike | None = None, model_name: str | None = None,
                     accuracy: Any = None, tensorrt: bool = False, max_batch_size: int = 32,
                     extra_meta: Mapping[str, Any] | None = None,
                     verify_images: Sequence[str | os.PathLike] = (),
                     progress: Callable[[str], None] | None = None) -> Path:
    """The part of :func:`build_hybrid` after names are resolved: A's ``features.onnx``, B's head
    ``(W_B, c_B)``, the map ``amap`` (``maps.AffineMap``) → verified hybrid at ``out``."""
    onnx = _onnx()
    from affeq_rt._version import __version__
    from affeq_rt.io.fsio import atomic_path
    from affeq_rt.io.maps import fold_head

    say = progress or (lambda _m: None)
    out_path = Path(out)
    _check_out(out_path, force)
    src, dst = a_spec.name, b_spec.name
    name = model_name or default_model_name(src, dst, fp16)
    if server_repo is not None:
        from affeq_rt.deploy.triton import check_repo_target

        check_repo_target(server_repo, name, force)
    w_b, c_b = (np.asarray(a) for a in head_b)
    if w_b.ndim != 2 or w_b.shape[1] != amap.weight.shape[0] or c_b.shape != (w_b.shape[0],):
        raise AffeqError(f"{dst}'s head is {w_b.shape}, the map {amap.key} gives "
                         f"{amap.weight.shape[0]} features", f"re-export {dst} or refit the map")
    w_fold, b_fold = fold_head(amap, w_b, c_b)

    say("composing the graph")
    try:
        features = onnx.load(str(features_path))
    except Exception as e:  # DecodeError and friends
        raise AffeqError(f"{features_path} is not a readable ONNX model ({e.__class__.__name__})",
                         f"re-export it: affeq-rt export {src}") from None
    model = compose_hybrid(features, w_fold, b_fold, a_spec, with_preprocessing)
    if fp16:
        from affeq_rt.onnx.runtime import half_model

        model = half_model(model)

    stats = dict(amap.stats)
    acc = accuracy if accuracy is not None else next(
        (stats[k] for k in ("top1", "accuracy", "val_top1") if k in stats), None)
    pre = {
        "in_graph": with_preprocessing, "input": INPUT_NAME,
        "layout": "NHWC" if with_preprocessing else "NCHW",
        "dtype": "uint8" if with_preprocessing else "float32",
        "input_size": a_spec.input_size, "crop_pct": a_spec.crop_pct,
        "interpolation": a_spec.interpolation, "mean": list(a_spec.mean), "std": list(a_spec.std),
        "note": ("the graph does /255, -mean, /std and NHWC->NCHW; the caller resizes the short "
                 "side to floor(S/crop_pct) and centre-crops SxS (RGB)") if with_preprocessing
                else f"the caller applies affeq_rt.preprocess.preprocess with {src}'s spec",
    }
    labels = label_names(b_spec.num_classes, b_spec.label_offset)
    if len(labels) != w_fold.shape[0]:
        labels = [str(i) for i in range(w_fold.shape[0])]
    meta: dict[str, Any] = {
        "source": src, "target": dst, "method": amap.method,
        "fit_images": stats.get("images"), "fit_stats": stats,
        "accuracy": acc if acc is not None else "unknown", "preprocessing": pre,
        "label_offset": b_spec.label_offset, "labels": labels, "fp16": fp16,
        "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(extra_meta or {}),
    }

    say("verifying against the separate parts")
    x, x_u8, names = verification_inputs(a_spec, paths=verify_images)
    ref = reference_logits(features_path, amap.weight, amap.bias, (w_b, c_b), x, classifier_path)
    feed = x_u8 if with_preprocessing else x
    big = model.ByteSize() >= TWO_GB
    data_name = f"{out_path.name}.data" if big else None
    with atomic_path(out_path) as tmp:
        try:
            set_metadata(model, meta)
            _save(model, tmp, data_name)
            ver = verify(tmp, ref, feed, names, fp16)
            say(f"max relative error {ver.max_rel:.3g} (tolerance {ver.tolerance:g}); top-1 agrees "
                f"on {ver.top1_agree}/{ver.top1_checked} clear-margin images")
            if not ver.passed:
                raise AffeqError(
                    f"hybrid {src}->{dst} fails verification: max relative error {ver.max_rel:.3g}"
                    f" (tolerance {ver.tolerance:g}), top-1 agrees on {ver.top1_agree}/"
                    f"{ver.top1_checked} images", "report this as a bug with the maps file")
            meta["verification"] = ver.to_dict()
            set_metadata(model, meta)
            _save(model, tmp, data_name)
        except BaseException:
            if data_name is not None:
                (out_path.parent / data_name).unlink(missing_ok=True)
            raise
    if server_repo is not None:
        from affeq_rt.deploy.triton import write_model_repository

        say(f"writing the Triton model repository {server_repo}")
        write_model_repository(server_repo, name, out_path, labels=labels, force=force,
                               max_batch_size=max_batch_size, tensorrt=tensorrt, fp16=fp16)
    return out_path


def _save(model: onnx.ModelProto, path: Path, data_name: str | None) -> None:
    onnx = _onnx()
    if data_name is None:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        onnx.checker.check_model(str(path), full_check=True)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves the tensors out of the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
