"""KServe's model server behind ``affeq-rt serve``, assembled for a fixed set of ONNX models.

KServe (the ``serve`` extra) brings the Open Inference Protocol v2: its data plane
(``DataPlane``), model repository, tensor types (``InferRequest``/``InferResponse``, which
encode the binary tensor extension) and gRPC servicer. Its own ``ModelServer`` binds 0.0.0.0 and
``[::]``, reads ``sys.argv`` and serves a repository that loads and unloads models, so it is not
used: :func:`run_servers` starts a uvicorn REST server and a gRPC server on the address asked for,
around KServe's data plane and servicer, with these parts of ours:

- :class:`OnnxModel`: a ``kserve.Model`` that runs one ONNX file through onnxruntime, every
  input checked (name, datatype, shape, batch cap) before its data is decoded;
- :class:`ServedDataPlane`: ready only while every served model is; Triton's platform name;
- :class:`LockedRepositoryExtension`: repository load/unload refused (403);
- :func:`rest_app`: the REST routes (KServe's decode the binary extension's tensors into Python
  lists, and answer malformed JSON with FastAPI's 422): binary tensors are checked here and
  handed to KServe as arrays, every error is ``{"error": one line}``;
- :class:`BodyLimit` (REST) and :func:`check_raw_inputs` (gRPC): bounded requests.

Kept apart from :mod:`affeq_rt.deploy.serve` so that KServe is imported only when a server starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from affeq_rt.deploy.triton import OIP_TO_NUMPY, ORT_TO_OIP
from affeq_rt.onnx.runtime import create_session

_argv, sys.argv = sys.argv, sys.argv[:1]  # kserve.model_server parses sys.argv at import
try:
    import grpc
    from kserve import Model, ModelRepository
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
    from kserve.logging import configure_logging
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
finally:
    sys.argv = _argv
__all__ = ["build", "configure_logging", "run", "run_servers"]  # configure_logging: KServe's

#: Largest request body the REST server reads (bytes) and largest batch one request may carry.
#: Both are limits chosen, not measured optima: JSON numbers take ~10–20 bytes each and are
#: held as Python objects while decoding, so 64 MiB bounds one request to a few GB at most
#: (issue 10: one batch-256 JSON request took the server to 6.5 GB) and still carries a batch
#: of 16 float32 224×224 images (16·3·224²·~15 B ≈ 36 MB). gRPC messages have the same cap.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_BATCH = 64
HEADER_LENGTH = "inference-header-content-length"
#: How the served sessions are opened (``runtime.create_session``'s keywords; the benchmark's
#: bare session uses the same): no spin-waiting, whose CPU the event loop needs (with
#: INFER_THREADS, 17.7 → 12.9 ms of server CPU per request at 8 clients on 2 cores; spinning
#: off changes no arithmetic: docs/BENCHMARKS.md, "Serving throughput").
SESSION_OPTIONS: dict[str, Any] = {"spinning": False}
#: Inference calls running at once (the rest wait on the event loop): onnxruntime already
#: spreads one call over every core (intra-op threads), so more would only share the cores.
INFER_THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1)
#: Seconds an idle REST connection stays open (KServe's ModelServer default).
KEEP_ALIVE_S = 65
log = logging.getLogger("kserve.affeq_rt")  # under KServe's logger: its handler and format

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestError(InvalidInput):
    """A refused request: its HTTP status and one-line message (KServe answers InvalidInput
    400 on REST, INVALID_ARGUMENT on gRPC)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _one_line(e: BaseException | str) -> str:
    """An exception as one short line (onnxruntime's messages span several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------ the model

class OnnxModel(Model):
    """One ONNX file through onnxruntime, as a KServe model (``version``: the repository's)."""

    def __init__(self, name: str, version: str, path: str, provider: str = "auto") -> None:
        super().__init__(name)
        self.version, self.path, self.provider = version, path, provider

    def load(self) -> bool:
        """Create the session and record the input/output signatures."""
        self._sess = create_session(self.path, provider=self.provider, **SESSION_OPTIONS)
        # inference runs here, off the event loop: at most INFER_THREADS requests at once
        self._pool = ThreadPoolExecutor(INFER_THREADS, thread_name_prefix=f"infer-{self.name}")
        ins = self._sess.session.get_inputs()
        self._inputs = {i.name: ORT_TO_OIP.get(i.type, "FP32") for i in ins}
        # each input's dims after the batch (None: dynamic), checked before any data is decoded
        self._dims = {i.name: [d if isinstance(d, int) else None for d in i.shape[1:]]
                      for i in ins}
        self._outputs = list(self._sess.output_names)
        outs = {o.name: o for o in self._sess.session.get_outputs()}
        self._meta_out = [{"name": n, "datatype": ORT_TO_OIP.get(outs[n].type, "FP32"),
                           "shape": [-1, *(d if isinstance(d, int) else -1
                                           for d in outs[n].shape[1:])]}
                          for n in self._outputs]
        self.ready = True
        return True

    def get_input_types(self) -> list[dict[str, Any]]:
        """The inputs' metadata (batch dimension −1)."""
        return [{"name": n, "datatype": t, "shape": [-1, *(d if d is not None else -1
                                                           for d in self._dims[n])]}
                for n, t in self._inputs.items()]

    def get_output_types(self) -> list[dict[str, Any]]:
        """The outputs' metadata (batch dimension −1)."""
        return self._meta_out

    async def __call__(self, body: InferRequest,  # type: ignore[override]
                       headers: dict[str, str] | None = None, verb: Any = None  # noqa: ARG002
                       ) -> tuple[InferResponse, dict[str, str]]:
        """:meth:`predict`, without ``kserve.Model.__call__``'s preprocess/postprocess hooks and
        Prometheus latency histograms: this model has no hooks and this server no /metrics
        route, so they were event-loop work per request for nothing."""
        return await self.predict(body, headers), {}

    async def predict(self, payload: InferRequest,  # type: ignore[override]
                      headers: dict[str, str] | None = None) -> InferResponse:  # noqa: ARG002
        """Check and decode the inputs, run, answer the requested outputs."""
        feeds: dict[str, np.ndarray] = {}
        for inp in payload.inputs:
            want = self._inputs.get(inp.name)
            if want is None:
                raise RequestError(400, f"unknown input {inp.name!r}; this model takes "
                                        f"{sorted(self._inputs)}")
            if inp.name in feeds:
                raise RequestError(400, f"input {inp.name!r} is given twice; send each input "
                                        "once")
            if inp.datatype != want:
                raise RequestError(400, f"input {inp.name!r} is {inp.datatype}, the model "
                                        f"takes {want}")
            self._check_shape(inp.name, [int(d) for d in inp.shape])
            try:  # a binary tensor is an array already (attach_binary): not copied again
                data = inp.data
                arr = np.ascontiguousarray(data if isinstance(data, np.ndarray)
                                           else inp.as_numpy(), OIP_TO_NUMPY[want])
            except (ValueError, TypeError, OverflowError) as e:
                raise RequestError(400, f"input {inp.name!r} does not match its shape "
                                        f"{list(inp.shape)} and datatype {want} "
                                        f"({_one_line(e)})") from None
            feeds[inp.name] = arr
        missing = set(self._inputs) - set(feeds)
        if missing:
            raise RequestError(400, f"missing input(s) {sorted(missing)}")
        asked = payload.request_outputs or []
        names = [o.name for o in asked] or self._outputs
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise RequestError(400, f"unknown output(s) {unknown}; the model gives "
                                    f"{self._outputs}")
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._sess.session.run, names, feeds)
        except Exception as e:  # onnxruntime's InvalidArgument / Fail on bad shapes
            raise RequestError(400, f"inference failed: {_one_line(e)}") from None
        outputs = []
        for n, r in zip(names, results, strict=True):
            r = np.asarray(r)
            out = InferOutput(n, list(r.shape), ORT_TO_OIP_NUMPY[r.dtype.str])
            # as raw bytes: KServe's encoders turn them into JSON data or binary tensors (REST)
            # and raw_output_contents (gRPC; an array there is not supported)
            out.set_data_from_numpy(r, binary_data=True)
            outputs.append(out)
        return InferResponse(payload.id, self.name, outputs, model_version=self.version,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)

    def _check_shape(self, name: str, shape: list[int]) -> None:
        """The stated shape, before any data is decoded: the model's rank and fixed dims, no
        negative (inferred) dimension, and a batch of at most ``MAX_BATCH`` — the only bound on
        what a request may make the server allocate, so it must hold whatever the shape says."""
        dims = self._dims[name]
        expected = [-1, *(d if d is not None else -1 for d in dims)]
        if any(d < 0 for d in shape):
            raise RequestError(400, f"input {name!r} has a negative dimension in its shape "
                                    f"{shape}; state every dimension (the model takes "
                                    f"{expected})")
        if len(shape) != len(dims) + 1 or any(want is not None and got != want for got, want
                                               in zip(shape[1:], dims, strict=True)):
            raise RequestError(400, f"input {name!r} has shape {shape}, the model takes "
                                    f"{expected}")
        if shape[0] > MAX_BATCH:
            raise RequestError(413, f"input {name!r} has a batch of {shape[0]}; this server "
                                    f"takes at most {MAX_BATCH} per request; split the batch")


#: numpy dtype string (``'<f4'``) → OIP datatype, for the outputs.
ORT_TO_OIP_NUMPY = {np.dtype(v).str: k for k, v in OIP_TO_NUMPY.items()}


# ------------------------------------------------------------------- data plane and repository

class ServedDataPlane(DataPlane):
    """KServe's data plane for a fixed set of models: ready only while each is loaded and ready
    (KServe's answers ready with no model at all), metadata with Triton's platform name and the
    served version."""

    def __init__(self, repository: ModelRepository, names: list[str]) -> None:
        super().__init__(repository)
        self._names = list(names)

    async def ready(self) -> bool:
        """True only when each served model is in the repository and ready."""
        for name in self._names:
            if not await self.model_registry.is_model_ready(name):
                return False
        return True

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        """KServe's metadata, with ``platform`` and ``versions`` as Triton gives them."""
        meta = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        return {**meta, "platform": "onnxruntime_onnx", "versions": [model.version]}


class LockedRepositoryExtension(ModelRepositoryExtension):
    """The repository extension of a server of fixed models: the index lists them, load and
    unload are refused (REST and gRPC both go through it)."""

    async def load(self, model_name: str) -> None:
        """Refused: the server serves only the models named on its command line."""
        raise RequestError(403, f"loading models is disabled on this server (asked for "
                                f"{model_name!r}); restart affeq-rt serve with the model on "
                                "its command line")

    async def unload(self, model_name: str) -> None:
        """Refused: the served models stay loaded until the server stops."""
        raise RequestError(403, f"unloading models is disabled on this server (asked for "
                                f"{model_name!r}); stop the server to stop serving")


# ------------------------------------------------------------------------------------ REST

class _TooLarge(Exception):
    """Raised inside ``receive`` when a body grows past the limit (its message: the 413's)."""


async def _reply(send: Send, status: int, error: str) -> None:
    """Send a whole JSON error response ``{"error": ...}``."""
    resp = JSONResponse({"error": error}, status_code=status)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(resp.body)).encode())]})
    await send({"type": "http.response.body", "body": resp.body})


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes by its Content-Length, and
    :class:`_TooLarge` raised from ``receive`` once a body without one passes it (the routes
    answer 413); 415 for compressed bodies (a server that inflated them would do so unbounded)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the headers, then count the body while the app reads it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        # every Content-Encoding header and every coding in each (a list may repeat the header):
        # anything but identity is refused
        codings = [c.strip().lower() for k, v in scope.get("headers", [])
                   if k.decode("latin-1").lower() == "content-encoding"
                   for c in v.decode("latin-1").split(",")]
        enc = ", ".join(c for c in codings if c not in ("", "identity"))
        if enc:
            await _reply(send, 415, f"Content-Encoding {enc!r} is not accepted; send the body "
                                    "uncompressed")
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await _reply(send, 413, self._message(int(length)))
            return
        seen = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # rest_app's routes answer it: 413
                    raise _TooLarge(self._message(seen))
            return msg

        await self.app(scope, counted, send)

    def _message(self, size: int) -> str:
        return (f"request body of {size} bytes is over this server's limit of {self.limit} "
                f"bytes; send fewer images per request (at most {MAX_BATCH})")


def _malformed(errors: list[Any]) -> str:
    """One line for a request pydantic could not parse or validate (its first error)."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    what = _one_line(first.get("msg", "invalid request"))
    return (f"malformed request: {what}" + (f" at {where}" if where else "")
            + "; send an Open Inference Protocol v2 JSON request (binary tensors after a JSON "
              "header of Inference-Header-Content-Length bytes)")


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) of a request body; the tail is empty without the header, and
    a view of the body, not a copy (the tensors cut from it reach onnxruntime uncopied)."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not the "
                                f"length of a JSON header inside the {len(body)}-byte body; "
                                "send the JSON header's length in bytes")
    return body[:int(text)], memoryview(body)[int(text):]


def parse_request(head: bytes, name: str) -> InferRequest:
    """The JSON part of a request as KServe's ``InferRequest`` (validated with KServe's
    ``InferenceRequest`` model; a binary input has no ``data`` there: it gets an empty one until
    :func:`attach_binary` fills it)."""
    try:
        obj = json.loads(head)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(400, _malformed([{"msg": f"the body is not JSON "
                                                    f"({e.__class__.__name__})"}])) from None
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    for inp in inputs if isinstance(inputs, list) else []:
        if isinstance(inp, dict) and isinstance(inp.get("parameters"), dict) \
                and "binary_data_size" in inp["parameters"]:
            inp.setdefault("data", [])
    try:
        request = InferRequest.from_inference_request(InferenceRequest.model_validate(obj), name)
    except ValidationError as e:
        raise RequestError(400, _malformed(list(e.errors()))) from None
    # an output without its own binary_data takes the request's binary_data_output
    default = (request.parameters or {}).get("binary_data_output") is True
    for out in request.request_outputs or []:
        if out.binary_data is None:
            out.parameters = {**(out.parameters or {}), "binary_data": default}
    return request


def attach_binary(request: InferRequest, tail: bytes | memoryview) -> None:
    """Give each input with a ``binary_data_size`` parameter its tensor, cut from ``tail`` in
    input order, as an array; every size is checked against the shape and datatype, and every
    byte used."""
    offset = 0
    for inp in request.inputs:
        params = inp.parameters or {}
        if "binary_data_size" not in params:
            continue
        size = params["binary_data_size"]
        what = f"input {inp.name!r}"
        if inp.datatype not in OIP_TO_NUMPY:
            raise RequestError(400, f"{what} is {inp.datatype}, which this server does not "
                                    f"take as binary data; use one of {sorted(OIP_TO_NUMPY)}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(400, f"{what} has binary_data_size {size!r}; it must be a byte "
                                    "count")
        if any(d < 0 for d in inp.shape):
            raise RequestError(400, f"{what} has a negative dimension in its shape {inp.shape}")
        if len(inp.data or []) > 0:
            raise RequestError(400, f"{what} has both JSON data and binary_data_size; send one")
        if inp.shape and inp.shape[0] > MAX_BATCH:
            raise RequestError(413, f"{what} has a batch of {inp.shape[0]}; this server takes "
                                    f"at most {MAX_BATCH} per request; split the batch")
        dtype = np.dtype(OIP_TO_NUMPY[inp.datatype]).newbyteorder("<")
        count = math.prod(inp.shape)  # exact: a numpy product could wrap around
        if count * dtype.itemsize != size:
            raise RequestError(400, f"{what} has {size} bytes of binary data; shape "
                                    f"{inp.shape} of {inp.datatype} takes "
                                    f"{count * dtype.itemsize}")
        if offset + size > len(tail):
            raise RequestError(400, f"{what} needs bytes {offset}..{offset + size} of the "
                                    f"binary data, but the request has only {len(tail)}; the "
                                    "body is truncated")
        inp.data = np.frombuffer(tail, dtype, count, offset).reshape(inp.shape)
        inp.parameters = {k: v for k, v in params.items() if k != "binary_data_size"}
        offset += size
    if offset != len(tail):
        raise RequestError(400, f"the request carries {len(tail) - offset} bytes of binary "
                                "data that no input's binary_data_size accounts for")


def _error(exc: Exception) -> JSONResponse:
    """``{"error": one line}`` with the status the exception stands for; an unexpected one is
    500 (the server log keeps its traceback)."""
    if isinstance(exc, RequestError):
        status = exc.status
    elif isinstance(exc, ModelNotFound):
        status = 404
    elif isinstance(exc, ModelNotReady):
        status = 503
    elif isinstance(exc, InvalidInput):
        status = 400
    else:
        log.exception("internal error")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: "
                                      f"{_one_line(exc)}"}, status_code=500)
    return JSONResponse({"error": _one_line(exc)}, status_code=status)


def _guarded(fn: Callable[[Request], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
    """A route whose every error is ``{"error": one line}`` with the status it stands for."""
    async def route(request: Request) -> Response:
        try:
            return await fn(request)
        except _TooLarge as e:  # BodyLimit's, raised from inside the body read
            return JSONResponse({"error": str(e)}, status_code=413)
        except Exception as e:  # every error: one line, the status it stands for
            return _error(e)
    return route


async def _no_route(request: Request, exc: Exception) -> Response:
    """404/405 for a path or method the protocol does not have, as one line."""
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    return JSONResponse({"error": f"{request.method} {request.url.path}: "
                                  f"{_one_line(getattr(exc, 'detail', 'not found'))}; see "
                                  "the Open Inference Protocol v2 routes"},
                        status_code=status)


class _Rest:
    """The OIP v2 REST handlers over one KServe data plane and our locked repository."""

    def __init__(self, plane: ServedDataPlane, repository: LockedRepositoryExtension) -> None:
        self.plane, self.repository = plane, repository

    def model(self, request: Request) -> OnnxModel:
        """The served model the path names (and its version, when the path has one)."""
        name = request.path_params["name"]
        found = self.plane.get_model_from_registry(name)
        version = request.path_params.get("version")
        if version is not None and version != found.version:
            raise RequestError(404, f"model {name!r} has no version {version!r}; this server "
                                    f"serves version {found.version}")
        return found  # type: ignore[return-value]

    async def server_metadata(self, _: Request) -> Response:
        return JSONResponse(self.plane.metadata())

    async def live(self, _: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, _: Request) -> Response:
        if await self.plane.ready():
            return JSONResponse({"ready": True})
        return JSONResponse({"error": "not every served model is ready yet"}, status_code=503)

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(await self.plane.model_metadata(self.model(request).name))

    async def model_ready(self, request: Request) -> Response:
        name = self.model(request).name
        if await self.plane.model_ready(name):
            return JSONResponse({"name": name, "ready": True})
        raise ModelNotReady(name)

    async def infer(self, request: Request) -> Response:
        name = self.model(request).name
        head, tail = split_binary(await request.body(), request.headers.get(HEADER_LENGTH))
        payload = parse_request(head, name)
        attach_binary(payload, tail)
        response, _ = await self.plane.infer(name, payload)
        content, json_length = response.to_rest()
        if json_length is None:
            return Response(json.dumps(content, separators=(",", ":")).encode(),
                            media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(json_length)})

    async def index(self, request: Request) -> Response:
        body = await request.body()
        try:
            ready_only = bool(json.loads(body or b"{}").get("ready", False))
        except (ValueError, AttributeError):
            raise RequestError(400, _malformed([{"msg": "the repository index request is not "
                                                        "a JSON object"}])) from None
        return JSONResponse(await self.repository.index(ready_only))

    async def load(self, request: Request) -> Response:
        await self.repository.load(request.path_params["name"])
        return JSONResponse({})  # not reached: load is refused

    async def unload(self, request: Request) -> Response:
        await self.repository.unload(request.path_params["name"])
        return JSONResponse({})  # not reached: unload is refused


def rest_app(plane: ServedDataPlane, repository: LockedRepositoryExtension) -> Starlette:
    """The OIP v2 REST routes over KServe's data plane (health, metadata, inference with JSON or
    binary tensors, the repository extension), each error ``{"error": one line}``."""
    h = _Rest(plane, repository)
    m = "/v2/models/{name}"
    v = "/v2/models/{name}/versions/{version}"
    routes = [Route("/v2", _guarded(h.server_metadata)),
              Route("/v2/health/live", _guarded(h.live)),
              Route("/v2/health/ready", _guarded(h.ready)),
              *(r for p in (m, v) for r in (
                  Route(p, _guarded(h.model_metadata)),
                  Route(p + "/ready", _guarded(h.model_ready)),
                  Route(p + "/infer", _guarded(h.infer), methods=["POST"]))),
              Route("/v2/repository/index", _guarded(h.index), methods=["POST"]),
              Route("/v2/repository/models/{name}/load", _guarded(h.load), methods=["POST"]),
              Route("/v2/repository/models/{name}/unload", _guarded(h.unload), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: _no_route, 405: _no_route})


# ------------------------------------------------------------------------------------ gRPC

def check_raw_inputs(request: Any) -> None:
    """A gRPC ``ModelInferRequest``'s raw tensors, checked before KServe unpacks them: one raw
    entry per input without typed contents, each exactly its shape's bytes, no negative
    dimension, a batch of at most ``MAX_BATCH``. RequestError otherwise."""
    raw = list(request.raw_input_contents)
    if not raw:
        return
    pending = [i for i in request.inputs
               if not (i.HasField("contents") and i.contents.ListFields())]
    if len(pending) != len(raw) or len(pending) != len(request.inputs):
        raise RequestError(400, f"the request has {len(raw)} raw_input_contents for "
                                f"{len(pending)} input(s) without contents; send one per input")
    for inp, blob in zip(pending, raw, strict=True):
        what = f"input {inp.name!r}"
        shape = list(inp.shape)
        if inp.datatype not in OIP_TO_NUMPY:
            raise RequestError(400, f"{what} is {inp.datatype}, which this server does not "
                                    f"take as raw data; use one of {sorted(OIP_TO_NUMPY)}")
        if any(d < 0 for d in shape):
            raise RequestError(400, f"{what} has a negative dimension in its shape {shape}")
        if shape and shape[0] > MAX_BATCH:
            raise RequestError(413, f"{what} has a batch of {shape[0]}; this server takes at "
                                    f"most {MAX_BATCH} per request; split the batch")
        need = math.prod(shape) * np.dtype(OIP_TO_NUMPY[inp.datatype]).itemsize
        if len(blob) != need:
            raise RequestError(400, f"{what} has {len(blob)} bytes of raw data; shape {shape} "
                                    f"of {inp.datatype} takes {need}")


class CheckedServicer(InferenceServicer):
    """KServe's gRPC servicer, with raw tensors checked before they are unpacked."""

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's
        """:func:`check_raw_inputs`, then KServe's inference."""
        check_raw_inputs(request)
        return await super().ModelInfer(request, context)


#: HTTP status of a refusal → gRPC status code.
GRPC_STATUS = {403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
               413: grpc.StatusCode.RESOURCE_EXHAUSTED}


class OneLineStatus(ExceptionToStatusInterceptor):
    """Errors to gRPC status codes, logged in one line (KServe's interceptor logs each refused
    request with its traceback); an unexpected error is INTERNAL, its traceback logged."""

    async def handle_exception(self, ex: Exception, request_or_iterator: Any,  # noqa: ARG002
                               context: Any, method_name: str) -> None:
        if isinstance(ex, RequestError):
            code = GRPC_STATUS.get(ex.status, grpc.StatusCode.INVALID_ARGUMENT)
        elif isinstance(ex, ModelNotFound):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(ex, ModelNotReady):
            code = grpc.StatusCode.UNAVAILABLE
        elif isinstance(ex, InvalidInput):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            log.exception("internal error in %s", method_name)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error: {type(ex).__name__}: {_one_line(ex)}")
            return
        log.info("refused %s: %s", method_name, _one_line(ex))
        await context.abort(code, _one_line(ex))


# ------------------------------------------------------------------------------------ servers

def build(models: list[tuple[str, str, str]], provider: str
          ) -> tuple[ServedDataPlane, LockedRepositoryExtension]:
    """KServe's data plane and repository extension over the (name, version, path) models,
    each loaded now."""
    repository = ModelRepository(models_dir="")  # never listed: the models are given
    for name, version, path in models:
        model = OnnxModel(name, version, path, provider)
        model.load()
        repository.update(model)
    return (ServedDataPlane(repository, [m[0] for m in models]),
            LockedRepositoryExtension(repository))


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on uvloop (uvicorn[standard], which KServe requires, brings
    it; its loop and transports are compiled, the standard library's are Python), or on
    asyncio's own loop where it is missing."""
    try:
        from uvloop import run as uvloop_run  # uvloop >= 0.18
    except ImportError:
        asyncio.run(main)
        return
    uvloop_run(main)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_servers(plane: ServedDataPlane, repository: LockedRepositoryExtension, host: str,
                      port: int, grpc_port: int) -> None:
    """Serve :func:`build`'s models on ``host`` (REST on ``port``, gRPC on ``grpc_port``) until
    SIGINT or SIGTERM, which uvicorn turns into a graceful stop of both."""
    import uvicorn

    limits = [("grpc.max_receive_message_length", MAX_BODY_BYTES),
              ("grpc.max_send_message_length", MAX_BODY_BYTES)]
    grpc_server = grpc.aio.server(interceptors=(OneLineStatus(),), options=limits)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        CheckedServicer(plane, repository), grpc_server)
    grpc_server.add_insecure_port(_address(host, grpc_port))
    # no access log line per request; log_config=None: kserve.logging configured the loggers;
    # idle connections kept 65 s (KServe's default; uvicorn's 5 s closed pooled client
    # connections between bursts: tritonclient then failed with "connection closed")
    config = uvicorn.Config(BodyLimit(rest_app(plane, repository)), host=host, port=port,
                            log_config=None, access_log=False, lifespan="on",
                            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=10)
    await grpc_server.start()
    try:
        await uvicorn.Server(config).serve()
    finally:
        await grpc_server.stop(grace=5)
