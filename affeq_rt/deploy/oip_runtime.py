"""The MLServer runtime behind ``affeq-rt serve``: one ONNX model through onnxruntime, and the
REST server's guards and its binary tensor extension.

Kept apart from :mod:`affeq_rt.deploy.serve` because it subclasses MLServer's ``MLModel`` at import
time: MLServer (the ``serve`` extra) is imported only when a server really starts.

MLServer speaks only the JSON form of the Open Inference Protocol over REST; Triton's clients
send binary tensors by default (``tritonclient.http``'s ``binary_data=True``: a JSON header of
``Inference-Header-Content-Length`` bytes, then each tensor's raw little-endian bytes, sized by
its ``binary_data_size`` parameter). :class:`BinaryTensors` implements that extension in front of
MLServer's data plane, for requests and for the outputs a request asks back in binary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.codecs.json import encode_to_json_bytes
from mlserver.errors import MLServerError
from mlserver.handlers import DataPlane, ModelRepositoryHandlers
from mlserver.repository import ModelRepository
from mlserver.settings import ModelSettings
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    RepositoryIndexRequest,
    RepositoryIndexResponse,
    State,
)
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from affeq_rt.deploy.triton import OIP_TO_NUMPY, ORT_TO_OIP
from affeq_rt.onnx.runtime import create_session

#: Largest request body the REST server reads (bytes) and largest batch one request may carry.
#: Both are limits chosen, not measured optima: JSON numbers take ~10–20 bytes each and MLServer
#: holds them as Python objects while decoding, so 64 MiB bounds one request to a few GB at most
#: (issue 10: one batch-256 JSON request took the server to 6.5 GB) and still carries a batch
#: of 16 float32 224×224 images (16·3·224²·~15 B ≈ 36 MB).
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_BATCH = 64

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(Exception):
    """Raised inside ``receive`` when a body grows past the limit."""


class OnnxRuntimeServing(MLModel):
    """MLServer runtime: one ONNX model through onnxruntime (``parameters.uri`` = the file,
    ``parameters.extra["provider"]`` = ``auto``/``cpu``/``cuda``/``tensorrt``)."""

    async def load(self) -> bool:
        """Create the session and record the input/output signatures."""
        params = self.settings.parameters
        provider = (params.extra or {}).get("provider", "auto") if params else "auto"
        self._sess = create_session(params.uri, provider=provider)
        self._inputs = {i.name: ORT_TO_OIP.get(i.type, "FP32")
                        for i in self._sess.session.get_inputs()}
        # each input's dims after the batch (None: dynamic), checked before any data is decoded
        self._dims = {i.name: [d if isinstance(d, int) else None for d in i.shape[1:]]
                      for i in self._sess.session.get_inputs()}
        self._outputs = self._sess.output_names
        self.ready = True
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Decode the inputs (shape and datatype checked), run, encode the requested outputs."""
        feeds: dict[str, np.ndarray] = {}
        for inp in payload.inputs:
            want = self._inputs.get(inp.name)
            if want is None:
                raise MLServerError(f"unknown input {inp.name!r}; this model takes "
                                    f"{sorted(self._inputs)}", status_code=400)
            if inp.name in feeds:
                raise MLServerError(f"input {inp.name!r} is given twice; send each input once",
                                    status_code=400)
            if inp.datatype != want:
                raise MLServerError(f"input {inp.name!r} is {inp.datatype}, the model takes "
                                    f"{want}", status_code=400)
            self._check_shape(inp.name, list(inp.shape))
            try:
                arr = np.ascontiguousarray(NumpyCodec.decode_input(inp), OIP_TO_NUMPY[want])
            except (ValueError, TypeError, OverflowError) as e:
                raise MLServerError(f"input {inp.name!r} does not match its shape {inp.shape} "
                                    f"and datatype {want} ({_one_line(e)})",
                                    status_code=400) from None
            if list(arr.shape) != list(inp.shape):  # the codec reshapes; nothing may be inferred
                raise MLServerError(f"input {inp.name!r} decodes to shape {list(arr.shape)}, "
                                    f"not the {inp.shape} it states", status_code=400)
            feeds[inp.name] = arr
        missing = set(self._inputs) - set(feeds)
        if missing:
            raise MLServerError(f"missing input(s) {sorted(missing)}", status_code=400)
        names = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise MLServerError(f"unknown output(s) {unknown}; the model gives {self._outputs}",
                                status_code=400)
        try:
            results = await asyncio.to_thread(self._sess.session.run, names, feeds)
        except Exception as e:  # onnxruntime's InvalidArgument / Fail on bad shapes
            raise MLServerError(f"inference failed: {_one_line(e)}", status_code=400) from None
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(n, np.asarray(r))
                     for n, r in zip(names, results, strict=True)],
        )


    def _check_shape(self, name: str, shape: list[int]) -> None:
        """The stated shape, before any data is decoded: the model's rank and fixed dims, no
        negative (inferred) dimension, and a batch of at most ``MAX_BATCH`` — the only bound on
        what a request may make the server allocate, so it must hold whatever the shape says."""
        dims = self._dims[name]
        expected = [-1, *(d if d is not None else -1 for d in dims)]
        if any(d < 0 for d in shape):
            raise MLServerError(f"input {name!r} has a negative dimension in its shape {shape}; "
                                f"state every dimension (the model takes {expected})",
                                status_code=400)
        if len(shape) != len(dims) + 1 or any(want is not None and got != want for got, want
                                               in zip(shape[1:], dims, strict=True)):
            raise MLServerError(f"input {name!r} has shape {shape}, the model takes "
                                f"{expected}", status_code=400)
        if shape[0] > MAX_BATCH:
            raise MLServerError(f"input {name!r} has a batch of {shape[0]}; this server takes "
                                f"at most {MAX_BATCH} per request; split the batch",
                                status_code=413)


def _one_line(e: BaseException) -> str:
    """An exception as one short line (onnxruntime's messages span several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


class NoRepository(ModelRepository):
    """MLServer's model repository for a server of fixed models: it holds nothing and reads no
    folder (the models come from the command line). With it no private folder of links is
    needed, so a ``kill -9`` of the server leaves nothing behind."""

    def __init__(self, root: str = "", **_: Any) -> None:
        self._root = root  # never read

    async def list(self) -> list[ModelSettings]:
        """Nothing: models are never discovered on disk."""
        return []

    async def find(self, name: str) -> list[ModelSettings]:  # noqa: ARG002 - the interface
        """Nothing: models are never discovered on disk."""
        return []


class LockedRepositoryHandlers(ModelRepositoryHandlers):
    """The repository API of a server that serves a fixed set of models: the index lists them,
    load and unload are refused (REST and gRPC go through these handlers)."""

    def __init__(self, base: ModelRepositoryHandlers, names: list[str]) -> None:
        super().__init__(repository=base._repository, model_registry=base._model_registry)
        self._names = list(names)

    async def index(self, payload: RepositoryIndexRequest) -> RepositoryIndexResponse:
        """The served models and their state, read from the registry (nothing else is listed)."""
        items = []
        for name in self._names:
            try:
                models = await self._model_registry.get_models(name)
            except MLServerError:
                models = []
            for model in models:
                item = await self._to_item(model.settings)
                if not payload.ready or item.state == State.READY:
                    items.append(item)
        return RepositoryIndexResponse(root=items)

    async def load(self, name: str) -> bool:
        """Refused: the server serves only the models named on its command line."""
        raise MLServerError(f"loading models is disabled on this server (asked for {name!r}); "
                            "restart affeq-rt serve with the model on its command line",
                            status_code=403)

    async def unload(self, name: str) -> bool:
        """Refused: the served models stay loaded until the server stops."""
        raise MLServerError(f"unloading models is disabled on this server (asked for {name!r}); "
                            "stop the server to stop serving", status_code=403)


class ExpectedDataPlane(DataPlane):
    """MLServer's data plane with readiness = every expected model loaded and ready
    (MLServer's own answers ready when no model is loaded at all)."""

    def __init__(self, base: DataPlane, names: list[str]) -> None:
        # take over ``base`` as it is: a second DataPlane would register its Prometheus
        # metrics twice
        self.__dict__.update(base.__dict__)
        self._names = list(names)

    async def ready(self) -> bool:
        """True only when each served model is in the registry and ready."""
        for name in self._names:
            try:
                if not await super().model_ready(name):
                    return False
            except MLServerError:  # not found (yet, or any more)
                return False
        return True


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (by Content-Length, or counted as it
    arrives), 415 for compressed bodies (MLServer inflates gzip without a bound)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the headers, then count the body while the app reads it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        # every Content-Encoding header and every coding in each (a list may repeat the header,
        # and MLServer inflates if any says gzip): anything but identity is refused
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
        started = False

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        async def tracked_send(msg: MutableMapping[str, Any]) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await _reply(send, 413, self._message(seen))

    def _message(self, size: int) -> str:
        return (f"request body of {size} bytes is over this server's limit of {self.limit} "
                f"bytes; send fewer images per request (at most {MAX_BATCH})")


#: REST inference paths (``/v2/models/NAME[/versions/V]/infer``), as MLServer routes them.
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
HEADER_LENGTH = "inference-header-content-length"


class _BadBinary(Exception):
    """A binary-extension request that cannot be decoded: (status, one-line message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _param(params: Any, key: str) -> Any:
    """``params[key]`` of an OIP ``Parameters`` object (extra fields), else None."""
    return (getattr(params, "model_extra", None) or {}).get(key) if params is not None else None


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a request body; the tail is empty without the header."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise _BadBinary(400, f"Inference-Header-Content-Length {header_length!r} is not the "
                              f"length of a JSON header inside the {len(body)}-byte body; send "
                              "the JSON header's length in bytes")
    return body[:int(text)], body[int(text):]


def parse_header(head: bytes) -> InferenceRequest:
    """The JSON header as an ``InferenceRequest`` (a binary input has no ``data`` field there:
    it gets an empty one until :func:`attach_binary` fills it)."""
    try:
        obj = json.loads(head)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _BadBinary(400, _malformed([{"msg": f"the JSON header is not JSON "
                                                  f"({e.__class__.__name__})"}])) from None
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    for inp in inputs if isinstance(inputs, list) else []:
        if isinstance(inp, dict) and isinstance(inp.get("parameters"), dict) \
                and "binary_data_size" in inp["parameters"]:
            inp.setdefault("data", [])
    try:
        return InferenceRequest.model_validate(obj)
    except ValidationError as e:
        raise _BadBinary(400, _malformed(list(e.errors()))) from None


def attach_binary(payload: InferenceRequest, tail: bytes) -> None:
    """Replace each input's ``binary_data_size`` parameter by its tensor, cut from ``tail`` in
    input order; every size is checked against the shape and datatype, and every byte used."""
    offset = 0
    for inp in payload.inputs:
        size = _param(inp.parameters, "binary_data_size")
        if size is None:
            continue
        what = f"input {inp.name!r}"
        if inp.datatype not in OIP_TO_NUMPY:
            raise _BadBinary(400, f"{what} is {inp.datatype}, which this server does not take "
                                  f"as binary data; use one of {sorted(OIP_TO_NUMPY)}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _BadBinary(400, f"{what} has binary_data_size {size!r}; it must be a byte "
                                  "count")
        if any(d < 0 for d in inp.shape):
            raise _BadBinary(400, f"{what} has a negative dimension in its shape {inp.shape}")
        if inp.data is not None and len(getattr(inp.data, "root", inp.data) or []) > 0:
            raise _BadBinary(400, f"{what} has both JSON data and binary_data_size; send one")
        if inp.shape and inp.shape[0] > MAX_BATCH:
            raise _BadBinary(413, f"{what} has a batch of {inp.shape[0]}; this server takes at "
                                  f"most {MAX_BATCH} per request; split the batch")
        dtype = np.dtype(OIP_TO_NUMPY[inp.datatype]).newbyteorder("<")
        count = math.prod(inp.shape)  # exact: a numpy product could wrap around
        if count * dtype.itemsize != size:
            raise _BadBinary(400, f"{what} has {size} bytes of binary data; shape {inp.shape} "
                                  f"of {inp.datatype} takes {count * dtype.itemsize}")
        if offset + size > len(tail):
            raise _BadBinary(400, f"{what} needs bytes {offset}..{offset + size} of the binary "
                                  f"data, but the request has only {len(tail)}; the body is "
                                  "truncated")
        inp.data = np.frombuffer(tail, dtype, count, offset).reshape(inp.shape)  # type: ignore
        inp.parameters.model_extra.pop("binary_data_size")  # type: ignore[union-attr]
        offset += size
    if offset != len(tail):
        raise _BadBinary(400, f"the request carries {len(tail) - offset} bytes of binary data "
                              "that no input's binary_data_size accounts for")


def binary_outputs(payload: InferenceRequest, names: list[str]) -> set[str]:
    """The outputs to answer in binary: each requested output's ``binary_data`` parameter, else
    the request's ``binary_data_output``."""
    default = _param(payload.parameters, "binary_data_output") is True
    asked = {o.name: _param(o.parameters, "binary_data") for o in payload.outputs or []}
    return {n for n in names if (asked.get(n) if asked.get(n) is not None else default) is True}


def encode_response(response: InferenceResponse, binary: set[str]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): the outputs in ``binary`` as raw little-endian bytes
    after the JSON header (``binary_data_size`` each), the others as JSON data."""
    head = response.model_dump(exclude_unset=True, exclude_none=True)
    blobs = []
    for out in head.get("outputs", []):
        if out["name"] not in binary:
            continue
        dtype = np.dtype(OIP_TO_NUMPY[out["datatype"]]).newbyteorder("<")
        data = out.pop("data")
        blob = np.asarray([np.nan if v is None else v for v in data], dtype).tobytes()
        out.setdefault("parameters", {})["binary_data_size"] = len(blob)
        blobs.append(blob)
    header = encode_to_json_bytes(head)
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


class BinaryTensors:
    """ASGI middleware: the binary tensor extension of the Open Inference Protocol on REST
    inference requests. A request with an ``Inference-Header-Content-Length`` header, or one
    that asks for binary outputs, is decoded here (sizes checked: 400 in one line otherwise),
    run through MLServer's data plane and answered in the requested form; any other request
    goes on to MLServer unchanged."""

    def __init__(self, app: ASGIApp, data_plane: DataPlane) -> None:
        self.app, self.data_plane = app, data_plane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read an inference request's body; answer it here if it uses the extension."""
        match = INFER_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        header_length = headers.get(HEADER_LENGTH)
        if header_length is None and b"binary_data" not in body:
            replayed = False

            async def replay() -> MutableMapping[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
            return
        status, content, extra = await self._infer(body, header_length, match["name"],
                                                   match["version"])
        out_headers = [(b"content-length", str(len(content)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": content})

    async def _infer(self, body: bytes, header_length: str | None, name: str,
                     version: str | None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, headers) of one binary-extension inference."""
        as_json = [(b"content-type", b"application/json")]
        try:
            head, tail = split_binary(body, header_length)
            payload = parse_header(head)
            attach_binary(payload, tail)
            response = await self.data_plane.infer(payload, name, version)
            names = [o.name for o in response.outputs]
            content, length = encode_response(response, binary_outputs(payload, names))
        except _BadBinary as e:
            return e.status, encode_to_json_bytes({"error": str(e)}), as_json
        except MLServerError as e:
            return e.status_code, encode_to_json_bytes({"error": _one_line(e)}), as_json
        if length is None:
            return 200, content, as_json
        return 200, content, [(b"content-type", b"application/octet-stream"),
                              (HEADER_LENGTH.encode(), str(length).encode())]


async def _reply(send: Send, status: int, error: str) -> None:
    """Send a whole JSON error response ``{"error": ...}`` (MLServer's error form)."""
    resp = JSONResponse({"error": error}, status_code=status)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(resp.body)).encode())]})
    await send({"type": "http.response.body", "body": resp.body})


def _malformed(errors: list[Any]) -> str:
    """One line for a request pydantic could not parse or validate (its first error)."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    what = _one_line(first.get("msg", "invalid request"))
    return (f"malformed request: {what}" + (f" at {where}" if where else "")
            + "; send an Open Inference Protocol v2 JSON request (binary tensors after a JSON "
              "header of Inference-Header-Content-Length bytes)")


async def _bad_request(_request: Request, exc: Exception) -> JSONResponse:
    """A request FastAPI could not parse (not JSON) or validate (not an inference request):
    400 with one line, no traceback (FastAPI's default is a 422 with a list of details)."""
    errs = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"error": _malformed(errs)}, status_code=400)


async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    """Anything else: 500 with one line (the server log keeps the details)."""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {_one_line(exc)}"},
                        status_code=500)


class ClientErrorsOneLine(logging.Filter):
    """Log a refused client request (an ``MLServerError`` under 500, which MLServer's gRPC
    layer logs with ``logger.exception``) as its one-line message, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop the traceback of client errors; keep every record."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MLServerError) and exc.status_code < 500:
            record.exc_info, record.exc_text = None, None
        return True


def check_raw_inputs(request: Any) -> None:
    """A gRPC ``ModelInferRequest``'s raw tensors, checked before MLServer unpacks them (its
    converter raised ``struct.error``, answered INTERNAL with a traceback, on a short tensor):
    one raw entry per input without typed contents, each exactly its shape's bytes, no negative
    dimension, a batch of at most ``MAX_BATCH``. MLServerError (400) otherwise."""
    raw = list(request.raw_input_contents)
    if not raw:
        return
    pending = [i for i in request.inputs
               if not (i.HasField("contents") and i.contents.ListFields())]
    if len(pending) != len(raw):
        raise MLServerError(f"the request has {len(raw)} raw_input_contents for {len(pending)} "
                            "input(s) without contents; send one per input", status_code=400)
    for inp, blob in zip(pending, raw, strict=True):
        what = f"input {inp.name!r}"
        shape = list(inp.shape)
        if inp.datatype not in OIP_TO_NUMPY:
            raise MLServerError(f"{what} is {inp.datatype}, which this server does not take as "
                                f"raw data; use one of {sorted(OIP_TO_NUMPY)}", status_code=400)
        if any(d < 0 for d in shape):
            raise MLServerError(f"{what} has a negative dimension in its shape {shape}",
                                status_code=400)
        if shape and shape[0] > MAX_BATCH:
            raise MLServerError(f"{what} has a batch of {shape[0]}; this server takes at most "
                                f"{MAX_BATCH} per request; split the batch", status_code=413)
        need = math.prod(shape) * np.dtype(OIP_TO_NUMPY[inp.datatype]).itemsize
        if len(blob) != need:
            raise MLServerError(f"{what} has {len(blob)} bytes of raw data; shape {shape} of "
                                f"{inp.datatype} takes {need}", status_code=400)


def _check_grpc_inputs(grpc_server: Any) -> None:
    """Make ``grpc_server`` (MLServer's ``GRPCServer``, not started yet) check raw tensors with
    :func:`check_raw_inputs` before its inference servicer converts a request."""
    create = grpc_server._create_server

    def create_checked() -> Any:
        server = create()
        servicer = grpc_server._inference_servicer
        convert = servicer._InsertHeaders

        def checked(request: Any, context: Any) -> InferenceRequest:
            check_raw_inputs(request)
            return convert(request, context)

        servicer._InsertHeaders = checked
        return server

    grpc_server._create_server = create_checked


class LockedMLServer(MLServer):
    """MLServer serving a fixed set of models: repository load/unload refused, readiness over the
    expected models, bounded request bodies, malformed requests answered 400 in one line, and
    the binary tensor extension Triton's clients use by default."""

    def __init__(self, settings: Any, names: list[str]) -> None:
        self._served_names = list(names)
        super().__init__(settings)
        for name in ("mlserver", "mlserver.grpc", "mlserver.rest"):
            logging.getLogger(name).addFilter(ClientErrorsOneLine())

    def _create_servers(self) -> None:
        self._model_repository_handlers = LockedRepositoryHandlers(
            self._model_repository_handlers, self._served_names)
        self._data_plane = ExpectedDataPlane(self._data_plane, self._served_names)
        super()._create_servers()
        _check_grpc_inputs(self._grpc_server)
        app = self._rest_server._app
        app.add_exception_handler(RequestValidationError, _bad_request)  # bad JSON too
        app.add_exception_handler(Exception, _internal)
        app.add_middleware(BinaryTensors, data_plane=self._data_plane)
        app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # outermost: bounds what is read

    async def stop(self, sig: int | None = None) -> None:
        """Stop gracefully on Ctrl-C as on SIGTERM: MLServer passes the signal on to uvicorn,
        where a SIGINT after the one uvicorn caught itself means "force exit" (its lifespan task
        is then cancelled and a traceback logged)."""
        await super().stop(signal.SIGTERM if sig == signal.SIGINT else sig)
