"""Throughput of `affeq-rt serve` against a bare onnxruntime session on the same file, same run.

Four ways to answer batch-1 requests from C concurrent clients (threads), for --seconds each:
  * ``bare``   — C threads call one onnxruntime session directly, opened as the server opens
                 its own (``runtime.create_session`` with ``oip_runtime.SESSION_OPTIONS``): the
                 baseline of the ratios, so that they measure serving, not session options;
  * ``ort``    — the same with onnxruntime's default options (``create_session`` as it comes),
                 for reference: what the server's options do to a bare session;
  * ``binary`` — C tritonclient.http clients in their default mode (binary tensors both ways)
                 against ``affeq-rt serve`` on 127.0.0.1;
  * ``json``   — the same clients sending and receiving JSON tensors.
Rounds run the four in rotating order; each round gives requests/s per mode, and the ratios to
``bare`` are taken per round (drifts in machine load hit the modes of a round alike), then their
median is reported. CPU per request: this process's CPU for ``bare`` and ``ort``, the server
process's for the served modes (the clients' own CPU is printed apart: on a small machine they
compete with the server for the same cores, which the throughput ratio includes).

    affeq-rt build-hybrid --src efficientnet_lite0 --dst mobilenet_v2 --out /tmp/h.onnx
    python bench/serve_throughput.py --model /tmp/h.onnx
    python bench/serve_throughput.py --model /tmp/h_u8.onnx   # a --with-preprocessing hybrid
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from affeq_rt.deploy.oip_runtime import SESSION_OPTIONS
from affeq_rt.deploy.serve import free_port
from affeq_rt.onnx.runtime import create_session

HOST = "127.0.0.1"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(call: Callable[[int], None], clients: int, seconds: float) -> int:
    """Run ``call(client)`` in ``clients`` threads for ``seconds``; the number of calls made."""
    stop = time.perf_counter() + seconds
    counts = [0] * clients

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            call(i)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


@contextlib.contextmanager
def served(model: Path, name: str) -> Iterator[tuple[int, int]]:
    """``affeq-rt serve model`` on a free port: (REST port, server pid)."""
    import tritonclient.http as th

    port = free_port(HOST)
    proc = subprocess.Popen([sys.executable, "-m", "affeq_rt.cli.main", "serve", str(model),
                             "--port", str(port), "--grpc-port", str(free_port(HOST)),
                             "--name", name], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = th.InferenceServerClient(f"{HOST}:{port}")
    try:
        for _ in range(600):
            with contextlib.suppress(Exception):
                if client.is_model_ready(name):
                    break
            if proc.poll() is not None:
                raise SystemExit(f"affeq-rt serve exited {proc.returncode}")
            time.sleep(0.2)
        else:
            raise SystemExit("affeq-rt serve did not get ready in 120 s")
        yield port, proc.pid
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="a hybrid .onnx file")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="per mode and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the server this run started is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    import tritonclient.http as th

    sess = create_session(args.model, provider="cpu", **SESSION_OPTIONS).session
    default = create_session(args.model, provider="cpu").session
    inp = sess.get_inputs()[0]
    dims = [1, *inp.shape[1:]]
    u8 = inp.type == "tensor(uint8)"
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, dims).astype(np.uint8) if u8
         else rng.standard_normal(dims).astype(np.float32))
    outputs = [o.name for o in sess.get_outputs()]
    name = "bench"

    with served(args.model, name) as (port, pid):
        local = threading.local()  # tritonclient.http runs on gevent: one client per thread

        def request(binary: bool) -> Callable[[int], None]:
            def call(_i: int) -> None:
                if not hasattr(local, "client"):
                    local.client = th.InferenceServerClient(f"{HOST}:{port}")
                t = th.InferInput(inp.name, dims, "UINT8" if u8 else "FP32")
                t.set_data_from_numpy(x, binary_data=binary)
                res = local.client.infer(name, [t], outputs=[
                    th.InferRequestedOutput(n, binary_data=binary) for n in outputs])
                res.as_numpy(outputs[0])
            return call

        modes: dict[str, tuple[Callable[[int], None], Callable[[], float]]] = {
            "bare": (lambda _i: sess.run(outputs, {inp.name: x}), time.process_time),
            "ort": (lambda _i: default.run(outputs, {inp.name: x}), time.process_time),
            "binary": (request(True), lambda: _cpu_seconds(pid)),
            "json": (request(False), lambda: _cpu_seconds(pid)),
        }
        for call, _ in modes.values():  # warm-up, and a check that every mode answers
            call(0)
        print(f"# {args.model.name}: input {inp.name} {inp.type} {dims}; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}; {args.clients} clients, batch 1, "
              f"{args.seconds:.0f} s per mode and round; bare = create_session(**"
              f"{SESSION_OPTIONS}), ort = create_session()")
        print(f"{'round':>5}  {'bare/s':>7}  {'ort/s':>7}  {'binary/s':>8}  {'json/s':>7}  "
              f"{'bin/bare':>8}  {'bin/ort':>7}  {'json/bare':>9}  "
              f"{'CPU ms/req bare, ort, bin, json; clients bin':>44}  load")
        ratios: dict[str, list[float]] = {"binary": [], "json": [], "ort": []}
        cpu: dict[str, list[float]] = {k: [] for k in modes}
        client_cpu: list[float] = []
        for r in range(args.rounds):
            names = list(modes)
            names = names[r % len(names):] + names[:r % len(names)]
            rate: dict[str, float] = {}
            for k in names:
                call, clock = modes[k]
                c0, p0 = clock(), time.process_time()
                n = _drive(call, args.clients, args.seconds)
                cpu[k].append((clock() - c0) / n * 1e3)
                if k == "binary":
                    client_cpu.append((time.process_time() - p0) / n * 1e3)
                rate[k] = n / args.seconds
            for k in ratios:
                ratios[k].append(rate[k] / rate["bare"])
            print(f"{r:>5}  {rate['bare']:>7.1f}  {rate['ort']:>7.1f}  {rate['binary']:>8.1f}  "
                  f"{rate['json']:>7.1f}  {ratios['binary'][-1]:>8.3f}  "
                  f"{rate['binary'] / rate['ort']:>7.3f}  {ratios['json'][-1]:>9.3f}  "
                  f"{cpu['bare'][-1]:>8.1f} {cpu['ort'][-1]:>6.1f} {cpu['binary'][-1]:>6.1f} "
                  f"{cpu['json'][-1]:>7.1f}; {client_cpu[-1]:>5.2f}  "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    # binary against a session with onnxruntime's default options: (binary/bare) / (ort/bare)
    bin_ort = statistics.median(b / o for b, o in zip(ratios["binary"], ratios["ort"],
                                                      strict=True))
    print(f"median  binary/bare {statistics.median(ratios['binary']):.3f}  binary/ort "
          f"{bin_ort:.3f}  json/bare {statistics.median(ratios['json']):.3f}  "
          "ort/bare "
          f"{statistics.median(ratios['ort']):.3f}  CPU per request: bare {med['bare']:.1f} ms, "
          f"ort {med['ort']:.1f} ms, binary {med['binary']:.1f} ms "
          f"({med['binary'] / med['bare']:.2f}x) + clients {statistics.median(client_cpu):.2f} "
          f"ms, json {med['json']:.1f} ms ({med['json'] / med['bare']:.2f}x)")


if __name__ == "__main__":
    main()
