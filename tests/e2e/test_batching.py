"""Dynamic batching through a real daemon: concurrent HTTP requests to a model with
[models.<name>] max_batch_size = 4 form one batch of 4 (a 600 s max_queue_delay_us,
so the batch goes when full, not when a timer says), and each answer equals the
same input run alone in-process on the same bundle: exactly, since onnxruntime
computes a row of a batch with the same operations as the row alone (checked on
both models here; a runtime that did not would need allclose)."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest

from benchmarks.batching import CNN_SHAPE, write_cnn_bundle
from edged.bundle import open_bundle
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions
from tests.helpers import http, start_daemon

BATCH = 4
WAIT_S = 120.0  # bound on a request thread; reached only on a hang


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, demo_bundles):
    root = tmp_path_factory.mktemp("batching-models")
    (root / "digits-onnx").symlink_to(demo_bundles / "digits-onnx")
    write_cnn_bundle(root / "cnn224")
    return root


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, models_dir):
    tables = "".join(f"[models.{name}]\nmax_batch_size = {BATCH}\nmax_queue_delay_us = 600000000\n"
                     for name in ("digits-onnx", "cnn224"))
    proc = start_daemon(tmp_path_factory.mktemp("batching-daemon"), models_dir, 'load = ["digits-onnx", "cnn224"]\n' + tables)
    yield proc
    proc.stop()


def _infer(url: str, model: str, x: np.ndarray) -> tuple[int, object]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    status, body, headers = http("POST", f"{url}/v2/models/{model}/infer", head + x.tobytes(),
                                 {"Inference-Header-Content-Length": str(len(head))}, timeout=WAIT_S)
    if status != 200:
        return status, json.loads(body)
    length = int(headers["Inference-Header-Content-Length"])
    shape = json.loads(body[:length])["outputs"][0]["shape"]
    return status, np.frombuffer(body[length:], np.float32).reshape(shape)


def _histogram(url: str, metric: str, model: str) -> dict[str, float]:
    _, body, _ = http("GET", f"{url}/metrics")
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(rf'^{metric}(_sum|_count){{[^}}]*model="{model}"[^}}]*}} (\S+)$', body.decode(), re.M)}


@pytest.mark.parametrize("model, shape", [("digits-onnx", (1, 8, 8)), ("cnn224", CNN_SHAPE)])
def test_concurrent_requests_are_batched_and_answer_as_alone(daemon, models_dir, model, shape):
    rng = np.random.RandomState(7)
    xs = [rng.rand(1, *shape).astype(np.float32) for _ in range(BATCH)]
    bad = rng.rand(1, 2, *shape[1:]).astype(np.float32)  # wrong channel count: refused, alone
    requests = [*xs[:2], bad, *xs[2:]]
    answers: list = [None] * len(requests)

    def send(i: int) -> None:
        answers[i] = _infer(daemon.url, model, requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a batched request did not finish"

    status, error = answers[2]
    assert status == 400 and "expected shape" in error["error"]
    loaded = LoadedModel.load(open_bundle(models_dir / model), RuntimeOptions(threads=1), warmup=0)
    try:
        for x, (status, got) in zip(xs, answers[:2] + answers[3:]):
            assert status == 200
            assert np.array_equal(got, loaded.infer({"input": x})["logits"])
    finally:
        loaded.unload()
    rows = _histogram(daemon.url, "edged_batch_size", model)
    assert rows == {"_count": 1.0, "_sum": float(BATCH)}  # one batch of 4 was formed
    assert _histogram(daemon.url, "edged_batch_requests", model)["_sum"] == BATCH
