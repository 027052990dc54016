"""Timing helpers shared by the benchmark sections."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from typing import Callable

import numpy as np


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(call: Callable[[], object], seconds: float = 2.0, concurrency: int = 1, warmup: int = 20) -> dict[str, float]:
    """Run ``call`` in ``concurrency`` threads for ``seconds``; latency in µs."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    stop = [0.0]

    errors: list[BaseException] = []

    def worker(bucket: list[float]) -> None:
        try:
            for _ in range(warmup):  # in this thread: some clients are per-thread
                call()
            barrier.wait()
            barrier.wait()
            while time.perf_counter() < stop[0]:
                start = time.perf_counter()
                call()
                bucket.append(time.perf_counter() - start)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # the run fails with it instead of hanging at the barrier
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(b,)) for b in latencies]
    for t in threads:
        t.start()
    try:
        barrier.wait()
        start = time.perf_counter()
        stop[0] = start + seconds
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a benchmark client failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    elapsed = time.perf_counter() - start
    flat = [x * 1e6 for b in latencies for x in b]
    return {
        "p50_us": round(percentile(flat, 50), 1),
        "p99_us": round(percentile(flat, 99), 1),
        "mean_us": round(statistics.fmean(flat), 1),
        "rps": round(len(flat) / elapsed, 1),
        "n": len(flat),
    }


def binary_call(port: int, name: str, x: np.ndarray):
    """A minimal caller of ``name``'s infer on 127.0.0.1:``port``: one keep-alive
    http.client connection per client thread, binary tensors in and out."""
    local = threading.local()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + x.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}

    def call() -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", f"/v2/models/{name}/infer", body, headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {name}")

    return call
