"""Open Inference Protocol v2 conformance, against any server: health, metadata, JSON and binary
inference, errors (REST), and the same over gRPC.

By default the suite starts ``affeq-rt serve`` on a tiny hybrid (what CI runs). Point it at any
other server with environment variables, e.g. a Triton server a user runs on the repository
``affeq-rt build-hybrid --server-repo repo`` wrote::

    docker run --rm -p 8000:8000 -p 8001:8001 -v $PWD/repo:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
    AFFEQ_RT_OIP_URL=http://127.0.0.1:8000 AFFEQ_RT_OIP_GRPC=127.0.0.1:8001 \\
    AFFEQ_RT_OIP_MODEL=<name> AFFEQ_RT_OIP_ONNX=repo/<name>/1/model.onnx \\
        python -m pytest tests/test_oip_conformance.py

``AFFEQ_RT_OIP_GRPC`` (host:port) adds the gRPC checks; ``AFFEQ_RT_OIP_ONNX`` (the served file)
adds a bit-identity check of the answers against onnxruntime on the same file (Triton with its
default ONNX Runtime backend: same arithmetic, but a different onnxruntime build may round
differently; then compare with a tolerance yourself). Only what the protocol specifies is asserted:
status classes (4xx for a client error, not a particular code), an ``error`` string, tensor names,
datatypes and shapes as the model's metadata declares them.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

th = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter
NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8,
         "INT8": np.int8, "INT32": np.int32, "INT64": np.int64}


@dataclass(frozen=True)
class Target:
    """The server under test: REST host:port, gRPC host:port (or None), the model, and the
    served ONNX file when known."""

    rest: str
    grpc: str | None
    model: str
    onnx: Path | None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    url = os.environ.get("AFFEQ_RT_OIP_URL")
    if url:
        model = os.environ.get("AFFEQ_RT_OIP_MODEL")
        if not model:
            pytest.fail("AFFEQ_RT_OIP_URL needs AFFEQ_RT_OIP_MODEL (the model to query)")
        onnx_file = os.environ.get("AFFEQ_RT_OIP_ONNX")
        yield Target(urlsplit(url).netloc or url, os.environ.get("AFFEQ_RT_OIP_GRPC"), model,
                     Path(onnx_file) if onnx_file else None)
        return
    pytest.importorskip("kserve")
    pytest.importorskip("torch")
    from test_hybrid import TinyParts
    from test_serve import HOST, served

    from affeq_rt.deploy.serve import free_port

    base = tmp_path_factory.mktemp("oip")
    out = TinyParts(base / "parts").build(base / "h.onnx")
    port, grpc_port = free_port(HOST), free_port(HOST)
    with served(out, base / "server.log", name="tiny_a_to_tiny_b", port=port,
                grpc_port=grpc_port):
        yield Target(f"{HOST}:{port}", f"{HOST}:{grpc_port}", "tiny_a_to_tiny_b", out)


def call(t: Target, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, _, port = t.rest.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_client_error(status: int, body: bytes) -> str:
    """A 4xx whose body is ``{"error": "<one line>"}``, as the protocol specifies."""
    assert 400 <= status < 500, (status, body[:300])
    err = json.loads(body)["error"]
    assert isinstance(err, str), body[:300]
    assert err, body[:300]
    assert "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def metadata(target: Target) -> dict:
    status, _, body = call(target, "GET", f"/v2/models/{target.model}")
    assert status == 200, body[:300]
    return json.loads(body)


@pytest.fixture(scope="module")
def sample(metadata: dict) -> dict[str, np.ndarray]:
    """One valid input per declared input: batch 2, the declared datatype and dims, values a
    fixed random draw."""
    rng = np.random.default_rng(0)
    out = {}
    for inp in metadata["inputs"]:
        dims = [2 if d == -1 and i == 0 else d for i, d in enumerate(inp["shape"])]
        assert all(d > 0 for d in dims), f"a dynamic non-batch dimension: {inp}"
        dtype = NUMPY[inp["datatype"]]
        x = rng.integers(0, 255, dims) if np.issubdtype(dtype, np.integer) else \
            rng.standard_normal(dims)
        out[inp["name"]] = x.astype(dtype)
    return out


def json_request(sample: dict[str, np.ndarray], **params: object) -> bytes:
    return json.dumps({
        "inputs": [{"name": n, "shape": list(x.shape), "datatype": _oip(x),
                    "data": x.ravel().tolist()} for n, x in sample.items()],
        **({"parameters": params} if params else {})}).encode()


def _oip(x: np.ndarray) -> str:
    return next(k for k, v in NUMPY.items() if np.dtype(v) == x.dtype)


def decode_json_outputs(body: bytes) -> dict[str, np.ndarray]:
    res = json.loads(body)
    return {o["name"]: np.asarray(o["data"], NUMPY[o["datatype"]]).reshape(o["shape"])
            for o in res["outputs"]}


# ------------------------------------------------------------------------------ health, metadata

def test_health(target: Target) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{target.model}/ready"):
        status, _, body = call(target, "GET", path)
        assert status == 200, (path, status, body[:300])


def test_server_metadata(target: Target) -> None:
    status, _, body = call(target, "GET", "/v2")
    assert status == 200, body[:300]
    meta = json.loads(body)
    assert isinstance(meta["name"], str)
    assert isinstance(meta["version"], str)
    assert isinstance(meta["extensions"], list)


def test_model_metadata(target: Target, metadata: dict) -> None:
    assert metadata["name"] == target.model
    for t in metadata["inputs"] + metadata["outputs"]:
        assert set(t) >= {"name", "datatype", "shape"}, t
        assert t["datatype"] in NUMPY, t
        assert t["shape"][0] == -1, t  # the dynamic batch dimension
    if target.onnx is not None:
        import onnx

        graph = onnx.load(str(target.onnx), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        assert [t["name"] for t in metadata["inputs"]] == \
            [i.name for i in graph.input if i.name not in inits]
        assert [t["name"] for t in metadata["outputs"]] == [o.name for o in graph.output]


def test_unknown_model_is_a_client_error(target: Target) -> None:
    status, _, body = call(target, "GET", "/v2/models/no_such_model_here/ready")
    assert 400 <= status < 500, (status, body[:300])


# ------------------------------------------------------------------------------ inference

@pytest.fixture(scope="module")
def json_answer(target: Target, sample: dict[str, np.ndarray], metadata: dict
                ) -> dict[str, np.ndarray]:
    status, _, body = call(target, "POST", f"/v2/models/{target.model}/infer",
                           json_request(sample), {"Content-Type": "application/json"})
    assert status == 200, body[:300]
    out = decode_json_outputs(body)
    for t in metadata["outputs"]:  # every output, with its declared datatype and dims
        got = out[t["name"]]
        assert got.dtype == np.dtype(NUMPY[t["datatype"]])
        assert list(got.shape) == [2, *t["shape"][1:]]
    return out


def test_json_inference(json_answer: dict[str, np.ndarray], target: Target,
                        sample: dict[str, np.ndarray]) -> None:
    if target.onnx is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(target.onnx), providers=["CPUExecutionProvider"])
        names = list(json_answer)
        # the same file through onnxruntime; JSON carries float32 exactly (shortest repr)
        for n, want in zip(names, sess.run(names, sample), strict=True):
            np.testing.assert_array_equal(json_answer[n], want, err_msg=n)


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (True, False),
                                                      (False, True)])
def test_binary_tensors_equal_json(target: Target, sample: dict[str, np.ndarray],
                                   json_answer: dict[str, np.ndarray], binary_in: bool,
                                   binary_out: bool) -> None:
    """The binary tensor extension (tritonclient's default) gives the JSON answer bit for bit."""
    client = th.InferenceServerClient(target.rest)
    try:
        inputs = []
        for n, x in sample.items():
            inp = th.InferInput(n, list(x.shape), _oip(x))
            inp.set_data_from_numpy(x, binary_data=binary_in)
            inputs.append(inp)
        outs = [th.InferRequestedOutput(n, binary_data=binary_out) for n in json_answer]
        res = client.infer(target.model, inputs, outputs=outs)
    finally:
        client.close()
    for n, want in json_answer.items():
        np.testing.assert_array_equal(res.as_numpy(n), want, err_msg=n)


def test_binary_output_by_request_parameter(target: Target, sample: dict[str, np.ndarray],
                                            json_answer: dict[str, np.ndarray]) -> None:
    """``binary_data_output: true`` on a JSON request: the body is the JSON header of
    ``Inference-Header-Content-Length`` bytes, then each output's ``binary_data_size`` bytes."""
    status, headers, body = call(target, "POST", f"/v2/models/{target.model}/infer",
                                 json_request(sample, binary_data_output=True),
                                 {"Content-Type": "application/json"})
    assert status == 200, body[:300]
    n = int(headers["inference-header-content-length"])
    head, offset = json.loads(body[:n]), n
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        got = np.frombuffer(body[offset:offset + size], NUMPY[o["datatype"]]).reshape(o["shape"])
        np.testing.assert_array_equal(got, json_answer[o["name"]])
        offset += size
    assert offset == len(body)


# ------------------------------------------------------------------------------ errors

def _first(sample: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    return next(iter(sample.items()))


@pytest.mark.parametrize("case", ["not json", "no inputs field", "unknown input",
                                  "wrong datatype", "data shorter than the shape",
                                  "wrong dims", "binary size mismatch"])
def test_client_errors(target: Target, sample: dict[str, np.ndarray], case: str) -> None:
    name, x = _first(sample)
    inp = {"name": name, "shape": list(x.shape), "datatype": _oip(x), "data": x.ravel().tolist()}
    headers = {"Content-Type": "application/json"}
    if case == "not json":
        body = b"{this is not json"
    elif case == "no inputs field":
        body = b'{"hello": 1}'
    elif case == "unknown input":
        body = json.dumps({"inputs": [{**inp, "name": "no_such_input"}]}).encode()
    elif case == "wrong datatype":
        other = "INT64" if inp["datatype"] != "INT64" else "FP32"
        body = json.dumps({"inputs": [{**inp, "datatype": other}]}).encode()
    elif case == "data shorter than the shape":
        body = json.dumps({"inputs": [{**inp, "data": inp["data"][:10]}]}).encode()
    elif case == "wrong dims":
        dims = [x.shape[0], *(d + 1 for d in x.shape[1:])]
        body = json.dumps({"inputs": [{**inp, "shape": dims, "data": [0] * math.prod(dims)}]
                           }).encode()
    else:
        head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape),
                                       "datatype": _oip(x),
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        body = head + x.tobytes()[:-4]
        headers["Inference-Header-Content-Length"] = str(len(head))
    status, _, reply = call(target, "POST", f"/v2/models/{target.model}/infer", body, headers)
    assert_client_error(status, reply)


def test_unknown_model_inference_is_a_client_error(target: Target,
                                                   sample: dict[str, np.ndarray]) -> None:
    status, _, body = call(target, "POST", "/v2/models/no_such_model_here/infer",
                           json_request(sample), {"Content-Type": "application/json"})
    assert_client_error(status, body)


# ------------------------------------------------------------------------------ gRPC

GRPC_CHECK = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg

url, model, data = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
c = tg.InferenceServerClient(url)
assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(model)
meta = c.get_model_metadata(model, as_json=True)
inputs = []
for t in meta["inputs"]:
    x = data[t["name"]]
    i = tg.InferInput(t["name"], list(x.shape), t["datatype"])
    i.set_data_from_numpy(x)
    inputs.append(i)
res = c.infer(model, inputs)
outs = {o["name"]: res.as_numpy(o["name"]) for o in meta["outputs"]}
np.savez(sys.argv[4], **outs)
try:
    c.infer("no_such_model_here", inputs)
    print("unknown model answered")
except tg.InferenceServerException as e:
    print(json.dumps({"status": str(e.status()), "message": e.message()}))
"""


def test_grpc(target: Target, sample: dict[str, np.ndarray],
              json_answer: dict[str, np.ndarray], tmp_path: Path) -> None:
    """tritonclient.grpc (in a subprocess: its protos and KServe's clash in one process):
    health, metadata, inference equal to the REST JSON answer, an unknown model refused."""
    if importlib.util.find_spec("grpc") is None:  # not imported here: the protos would clash
        pytest.skip("grpcio is not installed (pip install 'tritonclient[grpc]')")
    if target.grpc is None:
        pytest.skip("no gRPC address (set AFFEQ_RT_OIP_GRPC=host:port)")
    np.savez(tmp_path / "in.npz", **sample)
    res = subprocess.run([sys.executable, "-c", GRPC_CHECK, target.grpc, target.model,
                          str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    with contextlib.closing(np.load(tmp_path / "out.npz")) as got:
        for n, want in json_answer.items():
            np.testing.assert_array_equal(got[n], want, err_msg=n)
    err = json.loads(res.stdout.strip().splitlines()[-1])
    assert err["status"] in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT",
                             "StatusCode.UNAVAILABLE"), err
    assert "Traceback" not in err["message"]
