"""A hostile local client against ``affeq-rt serve`` (issue 10 items 1, 5, 8, 13).

One server on 127.0.0.1 serves a tiny hybrid from a folder anyone could write into (it stands
for /tmp), beside a planted model folder whose runtime would leave a marker file if it were ever
imported. The client tries the repository API (load the planted model, load or unload the served
one), sends every malformed and oversized request of ``REQUEST_CASES`` (JSON and the binary
tensor extension), then a bounded concurrent load (``LOAD_REQUESTS`` requests over
``LOAD_THREADS`` threads, JSON and binary mixed, each answer checked), and finally one
inference with Triton's own client in its default binary mode whose logits must equal
onnxruntime's on the same file. Every refusal is a 4xx with a one-line ``error`` and no
traceback; the server log holds no traceback at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("kserve")
grpc = pytest.importorskip("grpc")
th = pytest.importorskip("tritonclient.http")
pytest.importorskip("torch")

from test_serve import HOST, direct, served  # noqa: E402

from affeq_rt.deploy.serve import free_port  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter
NAME = "tiny_a_to_tiny_b"
#: The bounded load: requests in all, client threads, and the wall-clock bound. The tiny model
#: answers one request in milliseconds, so 200 take a few seconds even one after another on a
#: busy 2-core machine; the bound is there to catch a hang or a server that stops answering,
#: not to measure speed.
LOAD_REQUESTS, LOAD_THREADS, LOAD_WITHIN_S = 200, 8, 120.0


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | Sequence[tuple[str, str]] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port (10 s timeout): (status, headers, body). ``headers`` may
    be pairs, so that a header can be sent twice."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
    try:
        conn.putrequest(method, path)
        for k, v in pairs:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def one_line_error(body: bytes) -> str:
    """The ``error`` of a JSON error body, asserted to be one line without a traceback."""
    err = json.loads(body)["error"]
    assert "\n" not in err, err
    assert "Traceback" not in err, err
    return err


def oip_body(shape: list[int], data: object, datatype: str = "FP32") -> bytes:
    """A JSON inference request with one input ``image``."""
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                   "data": data}]}).encode()


def binary_request(x: np.ndarray, datatype: str = "FP32", *, size: int | None = None,
                   shape: list[int] | None = None, tail: bytes | None = None,
                   header_length: str | None = None, data: object = None,
                   binary_out: bool = True) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request as tritonclient builds it: JSON header, then ``x``'s bytes
    (each part overridable to make it wrong)."""
    raw = x.tobytes() if tail is None else tail
    inp = {"name": "image", "shape": list(x.shape) if shape is None else shape,
           "datatype": datatype, "parameters": {"binary_data_size": len(raw) if size is None
                                                else size}}
    if data is not None:
        inp["data"] = data
    head = json.dumps({"inputs": [inp], "outputs": [
        {"name": "logits", "parameters": {"binary_data": binary_out}}]}).encode()
    length = str(len(head)) if header_length is None else header_length
    return head + raw, {"Inference-Header-Content-Length": length}


def decode_binary(headers: dict[str, str], body: bytes) -> dict[str, np.ndarray]:
    """The outputs of a binary-extension response."""
    n = int(headers["inference-header-content-length"])
    head, offset, out = json.loads(body[:n]), n, {}
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(body[offset:offset + size], "<f4").reshape(o["shape"])
        offset += size
    assert offset == len(body)
    return out


@dataclass(frozen=True)
class RequestCase:
    """One hostile request: what it is, how it is sent, what the server must answer."""

    category: str
    name: str
    method: str
    path: str  # "{name}" = the served model
    status: int
    message: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


def _x(n: int = 1) -> np.ndarray:
    return np.zeros((n, 3, 32, 32), np.float32)


def _bin(name: str, status: int, message: str, **kw: object) -> RequestCase:
    x = kw.pop("x", _x())
    body, headers = binary_request(x, **kw)  # type: ignore[arg-type]
    return RequestCase("server requests", f"binary: {name}", "POST", "/v2/models/{name}/infer",
                       status, message, body, tuple(headers.items()))


def _json(name: str, body: bytes, status: int, message: str,
          headers: tuple[tuple[str, str], ...] = ()) -> RequestCase:
    return RequestCase("server requests", f"json: {name}", "POST", "/v2/models/{name}/infer",
                       status, message, body, (("Content-Type", "application/json"), *headers))


def _repo(name: str, path: str, message: str) -> RequestCase:
    return RequestCase("server requests", f"repository: {name}", "POST", path, 403, message)


F32 = _x().tobytes()
REQUEST_CASES = [
    _repo("load a planted model", "/v2/repository/models/evil/load",
          "loading models is disabled"),
    _repo("load the served model again", "/v2/repository/models/{name}/load",
          "loading models is disabled"),
    _repo("unload the served model", "/v2/repository/models/{name}/unload",
          "unloading models is disabled"),
    _repo("unload an unknown model", "/v2/repository/models/nosuch/unload",
          "unloading models is disabled"),
    _json("not json", b"{this is not json", 400, "malformed request"),
    _json("json but not a request", b'{"hello": 1}', 400, "malformed request"),
    _json("wrong shape", oip_body([1, 3, 32, 32], [0.0] * 10), 400, "does not match its shape"),
    _json("strings as FP32", oip_body([1, 3, 32, 32], ["a"] * 3072), 400, "does not match"),
    _json("wrong datatype", oip_body([1, 3, 32, 32], [0] * 3072, "INT64"), 400, "is INT64"),
    _json("wrong image size", oip_body([1, 3, 8, 8], [0.0] * 192), 400,
          "has shape [1, 3, 8, 8], the model takes [-1, 3, 32, 32]"),
    # issue 23: a shape of -1 let the data say the batch (200 images passed the 64 cap)
    _json("inferred batch dimension", oip_body([-1, 3, 32, 32], [0.0] * 3072 * 65), 400,
          "negative dimension"),
    _json("input given twice", json.dumps({"inputs": [json.loads(oip_body(
        [1, 3, 32, 32], [0.0] * 3072))["inputs"][0]] * 2}).encode(), 400, "given twice"),
    _json("unknown input", oip_body([1, 3, 32, 32], [0.0] * 3072).replace(b'"image"',
                                                                          b'"pixels"'),
          400, "unknown input 'pixels'"),
    _json("batch over the cap", oip_body([65, 3, 32, 32], [0.0]), 413, "at most 64"),
    _json("gzip body", b"\x1f\x8b", 415, "send the body uncompressed",
          (("Content-Encoding", "gzip"),)),
    # issue 23: the last of two Content-Encoding headers was read; MLServer inflates any gzip
    _json("gzip, then identity", b"\x1f\x8b", 415, "send the body uncompressed",
          (("Content-Encoding", "gzip"), ("Content-Encoding", "identity"))),
    _json("identity, gzip in one header", b"\x1f\x8b", 415, "send the body uncompressed",
          (("Content-Encoding", "identity, gzip"),)),
    _bin("size does not match the shape", 400, "has 12284 bytes of binary data",
         tail=F32[:-4]),
    _bin("truncated body", 400, "the body is truncated", size=len(F32), tail=F32[:-100]),
    _bin("bytes no input accounts for", 400, "4 bytes of binary data that no input",
         size=len(F32), tail=F32 + b"tail"),
    _bin("header length not a number", 400, "Inference-Header-Content-Length 'abc'",
         header_length="abc"),
    _bin("header length past the body", 400, "is not the length of a JSON header",
         header_length="999999"),
    _bin("header length cuts the JSON", 400, "malformed request", header_length="20"),
    _bin("FP16 bytes sent as FP32", 400, "has 6144 bytes of binary data",
         tail=_x().astype(np.float16).tobytes()),
    _bin("INT64 for an FP32 input", 400, "is INT64, the model takes FP32", datatype="INT64",
         tail=np.zeros((1, 3, 32, 32), np.int64).tobytes()),
    _bin("BYTES datatype", 400, "does not take as binary data", datatype="BYTES"),
    _bin("negative binary_data_size", 400, "must be a byte count", size=-1, tail=b""),
    _bin("negative dimension", 400, "negative dimension", shape=[-1, 3, 32, 32]),
    _bin("JSON data and binary data", 400, "send one", data=[0.0]),
    _bin("batch over the cap", 413, "at most 64", x=_x(65)),
    RequestCase("server requests", "binary: unknown model", "POST", "/v2/models/nosuch/infer",
                404, "nosuch", *(lambda b, h: (b, tuple(h.items())))(*binary_request(_x()))),
]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A tiny hybrid in a folder others could write into, beside a planted model folder, and
    four photos the map was not fitted on, preprocessed for it."""
    from test_hybrid import TinyParts, held_out_inputs

    base = tmp_path_factory.mktemp("hostile")
    public = base / "public"
    parts = TinyParts(base / "parts")
    out = parts.build(public / "h.onnx")
    evil = public / "evil"
    evil.mkdir()
    # what a model server that loads from its folder would import (a KServe custom model,
    # MLServer's model-settings.json) and read (a Triton config)
    (evil / "model.py").write_text(f"open({str(base / 'pwned')!r}, 'w').write('x')\n")
    (evil / "model-settings.json").write_text(json.dumps(
        {"name": "evil", "implementation": "model.Evil"}))
    (evil / "config.pbtxt").write_text('name: "evil"\nbackend: "python"\n')
    return out, held_out_inputs(parts.spec_a)[0]


def test_hostile_client(hybrid: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    from affeq_rt.deploy.oip_runtime import MAX_BODY_BYTES

    hybrid, x = hybrid
    want = direct(hybrid, x)
    port, grpc_port = free_port(HOST), free_port(HOST)
    log = tmp_path / "server.log"
    with served(hybrid, log, name=NAME, port=port, grpc_port=grpc_port) as client:
        # ---- the repository API: nothing loads, nothing unloads, the index lists one model
        for case in REQUEST_CASES:
            status, _, body = request(port, case.method, case.path.format(name=NAME),
                                      case.body, case.headers)
            assert status == case.status, (case.name, status, body[:300])
            assert case.message in one_line_error(body), (case.name, body[:300])
        status, _, body = request(port, "POST", "/v2/repository/index", b"{}",
                                  {"Content-Type": "application/json"})
        assert status == 200, body
        assert [m["name"] for m in json.loads(body)] == [NAME]
        _grpc_repository_refused(grpc_port)
        _grpc_short_tensor_refused(grpc_port)
        # ---- a body announced over the cap is refused before it is read (JSON and binary)
        for extra in ("", "\r\nInference-Header-Content-Length: 10"):
            reply = _announce(port, MAX_BODY_BYTES + 1, extra)
            assert reply.startswith("HTTP/1.1 413"), reply[:200]
            assert "over this server's limit" in reply
        # ---- a body sent without a length (chunked) is refused once the count passes the cap
        for extra in ("", "\r\nInference-Header-Content-Length: 10"):
            reply = _chunked(port, MAX_BODY_BYTES + 2**20, extra)
            assert reply.startswith("HTTP/1.1 413"), reply[:300]
            assert "over this server's limit" in reply
        # ---- a bounded concurrent load, JSON and binary mixed, every answer checked
        t0 = time.monotonic()
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            results = list(pool.map(lambda i: _one(port, x, i), range(LOAD_REQUESTS)))
        took = time.monotonic() - t0
        print(f"{LOAD_REQUESTS} requests over {LOAD_THREADS} threads in {took:.1f} s")
        assert took < LOAD_WITHIN_S, took
        for i, got in enumerate(results):
            # the same file through the same onnxruntime on the same batch: bit-identical
            np.testing.assert_array_equal(got, want["logits"], err_msg=f"request {i}")
        # ---- still ready, and Triton's client in its default (binary) mode gets the logits
        assert request(port, "GET", "/v2/health/ready")[0] == 200
        inp = th.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer(NAME, [inp])
        np.testing.assert_array_equal(res.as_numpy("logits"), want["logits"])
        np.testing.assert_array_equal(res.as_numpy("probabilities"), want["probabilities"])
    assert not (hybrid.parent.parent / "pwned").exists()
    assert "Traceback" not in log.read_text()


def _one(port: int, x: np.ndarray, i: int) -> np.ndarray:
    """Request ``i`` of the load: even ones JSON, odd ones binary; the logits it returned."""
    path = f"/v2/models/{NAME}/infer"
    if i % 2:
        body, headers = binary_request(x)
        status, rh, data = request(port, "POST", path, body, headers)
        assert status == 200, data[:300]
        return decode_binary(rh, data)["logits"]
    body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}],
                       "outputs": [{"name": "logits"}]}).encode()
    status, _, data = request(port, "POST", path, body, {"Content-Type": "application/json"})
    assert status == 200, data[:300]
    out = json.loads(data)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _chunked(port: int, length: int, extra_headers: str) -> str:
    """Send ``length`` bytes as a chunked body (no Content-Length) in 1 MiB chunks, stopping
    when the server answers or closes; return what the server replies."""
    path = f"/v2/models/{NAME}/infer"
    chunk = b"%x\r\n%s\r\n" % (2**20, b" " * 2**20)
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json"
                  f"{extra_headers}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(length // 2**20):
                s.sendall(chunk)
            s.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while the body was still coming
            pass
        reply = b""
        with contextlib.suppress(OSError):
            while b"over this server's limit" not in reply:  # or until the server closes
                got = s.recv(65536)
                if not got:
                    break
                reply += got
    return reply.decode("latin-1")


def _announce(port: int, length: int, extra_headers: str) -> str:
    """Announce a ``length``-byte body, send one byte, return what the server replies."""
    path = f"/v2/models/{NAME}/infer"
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json"
                  f"{extra_headers}\r\nContent-Length: {length}\r\n\r\n{{".encode())
        reply = ""
        for _ in range(20):  # headers and body may come in separate packets
            chunk = s.recv(65536).decode("latin-1")
            reply += chunk
            if not chunk or "over this server's limit" in reply:
                break
    return reply


def _kserve_grpc() -> tuple[Any, Any]:
    """KServe's gRPC messages module and stub class (imported through oip_runtime, which keeps
    kserve from parsing pytest's command line)."""
    import importlib

    from affeq_rt.deploy import oip_runtime

    pb = importlib.import_module("kserve.protocol.grpc.grpc_predict_v2_pb2")
    return pb, oip_runtime.grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub


def _grpc_repository_refused(grpc_port: int) -> None:
    """The gRPC repository service goes through the same extension (KServe's own stubs:
    tritonclient.grpc's protos clash with KServe's in one process)."""
    pb, GRPCInferenceServiceStub = _kserve_grpc()

    with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError, match="loading models is disabled"):
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="evil"),
                                     timeout=10)
        with pytest.raises(grpc.RpcError, match="unloading models is disabled"):
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=NAME),
                                       timeout=10)


def _grpc_short_tensor_refused(grpc_port: int) -> None:
    """Raw gRPC tensors of the wrong size, or more raw entries than inputs: INVALID_ARGUMENT in
    one line (KServe's converter raises IndexError on extra entries, an INTERNAL error; MLServer's
    raised struct.error on a short one)."""
    pb, GRPCInferenceServiceStub = _kserve_grpc()

    def infer(*raw: bytes) -> None:
        t = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32",
                                                  shape=[1, 3, 32, 32])
        stub.ModelInfer(pb.ModelInferRequest(model_name=NAME, inputs=[t],
                                             raw_input_contents=list(raw)), timeout=10)

    with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        for raw, message in (((F32[:400],), "has 400 bytes of raw data"),
                             ((F32, F32), "2 raw_input_contents for 1 input")):
            with pytest.raises(grpc.RpcError) as err:
                infer(*raw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert message in err.value.details(), err.value.details()
        infer(F32)  # the right size still answers
