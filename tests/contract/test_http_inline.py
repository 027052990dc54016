"""Tiny models run on the event loop (no thread hop); big requests and slow
models still go to worker threads; `http.inline_max_us = 0` turns it off.

The decision compares the model's measured average latency with
`http.inline_max_us`, so each test sets the threshold far beyond any latency
(or far below it) and asserts the decision through the counter
`edged_http_inline_requests_total`: how fast the machine is never matters."""

from __future__ import annotations

import json
import re

import numpy as np

from tests.helpers import DEMO_BUNDLES, http, start_daemon

ALWAYS_FAST_US = "1e9"  # 1000 s: every batch-1 inference is "fast"
ALWAYS_SLOW_US = "1e-6"  # 1 ps: no inference is "fast"


def _inline_count(daemon) -> float:
    text = http("GET", daemon.url + "/metrics")[1].decode()
    match = re.search(r"^edged_http_inline_requests_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _infer(daemon, batch: int) -> None:
    x = np.random.default_rng(0).random((batch, 1, 8, 8), dtype=np.float32)
    status, body = daemon.post("/v2/models/digits-onnx/infer", {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 200, body
    assert np.asarray(body["outputs"][0]["data"]).size == batch * 10


def _daemon(tmp_path, inline_max_us: str):
    return start_daemon(tmp_path, DEMO_BUNDLES, extra_toml='load = ["digits-onnx"]',
                        env={"EDGED_HTTP_INLINE_MAX_US": inline_max_us})


def test_small_requests_run_inline_and_large_ones_do_not(tmp_path, demo_bundles):
    daemon = _daemon(tmp_path, ALWAYS_FAST_US)
    try:
        for _ in range(30):
            _infer(daemon, 1)
        assert _inline_count(daemon) == 30  # the warm-up seeds the latency: even the first one
        _infer(daemon, 400)  # 100 KiB of input: over the 64 KiB bound, a worker thread
        assert _inline_count(daemon) == 30
        _infer(daemon, 1)
        assert _inline_count(daemon) == 31
    finally:
        daemon.stop()


def test_slow_models_run_on_worker_threads(tmp_path, demo_bundles):
    daemon = _daemon(tmp_path, ALWAYS_SLOW_US)
    try:
        for _ in range(30):
            _infer(daemon, 1)
        assert _inline_count(daemon) == 0.0
    finally:
        daemon.stop()


def test_inline_can_be_turned_off(tmp_path, demo_bundles):
    daemon = _daemon(tmp_path, "0")
    try:
        for _ in range(30):
            _infer(daemon, 1)
        assert _inline_count(daemon) == 0.0
        assert json.loads(http("GET", daemon.url + "/v2/health/ready")[1])["ready"] is True
    finally:
        daemon.stop()
