import threading

import numpy as np
import pytest

from edged.config import Config
from edged.dataplane import DataPlane, InferenceRequest
from edged.errors import ModelNotFound, Overloaded
from edged.metrics import Metrics
from edged.registry import ModelRegistry
from tests.unit.tiny_model import write_tiny_bundle


@pytest.fixture()
def plane(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    config = Config(models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"), max_concurrency=1, max_queue=1)
    metrics = Metrics()
    dataplane = DataPlane(config, ModelRegistry(config, metrics), metrics)
    dataplane.start()
    yield dataplane
    dataplane.stop()


def test_concurrency_limit_queues_then_refuses(plane):
    entry = plane.registry.get("tiny")
    entry.acquire()  # the one running slot is taken
    queued = threading.Thread(target=lambda: entry.release() if entry.acquire() else None)
    queued.start()  # waits in the queue
    deadline = 100
    while entry.pending < 2 and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    request = InferenceRequest(model="tiny", inputs={"input": np.ones((1, 4), np.float32)})
    with pytest.raises(Overloaded, match="limit of 1 running and 1 queued"):
        plane.infer(request, "test")
    entry.release()
    queued.join(5)
    assert plane.infer(request, "test").outputs["y"].shape == (1, 3)
    text = plane.metrics.exposition().decode()
    assert 'edged_inference_failures_total{code="overloaded",model="tiny",transport="test",version="1.0.0"} 1.0' in text


def test_unknown_model(plane):
    with pytest.raises(ModelNotFound, match="known models: tiny"):
        plane.infer(InferenceRequest(model="nope", inputs={}), "test")


def test_entry_from_check_model_is_used_and_every_request_counted(plane):
    entry = plane.check_model("tiny")
    request = InferenceRequest(model="tiny", inputs={"input": np.ones((1, 4), np.float32)})
    for _ in range(3):
        assert plane.infer(request, "test", entry).version == "1.0.0"
    plane.infer(request, "other")
    text = plane.metrics.exposition().decode()
    assert 'edged_inference_requests_total{model="tiny",transport="test",version="1.0.0"} 3.0' in text
    assert 'edged_inference_requests_total{model="tiny",transport="other",version="1.0.0"} 1.0' in text
    assert 'edged_inference_duration_seconds_count{model="tiny",runtime="onnx",version="1.0.0"} 4.0' in text
    assert 'edged_queue_duration_seconds_count{model="tiny",version="1.0.0"} 4.0' in text
    assert 'edged_queue_depth{model="tiny",version="1.0.0"} 0.0' in text


def test_one_paused_run_barely_moves_the_inline_average_but_a_slow_model_gets_there(plane):
    """The average behind http.inline_max_us: a run the OS paused counts at most twice the
    average (+10 %), a model that stays slow still lifts it to its own latency."""
    import time

    entry = plane.check_model("tiny")
    runtime = entry.model.runtime
    real_infer = runtime.infer
    request = InferenceRequest(model="tiny", inputs={"input": np.ones((1, 4), np.float32)})

    def paused(inputs):  # the real runtime, after a pause of at least 2 ms
        time.sleep(0.002)
        return real_infer(inputs)

    entry.typical_latency_s = 1e-4
    runtime.infer = paused
    try:
        plane.infer(request, "test", entry)
        assert entry.typical_latency_s == pytest.approx(1.1e-4)
        assert plane.runs_inline(request, 1000.0, entry)  # with http.inline_max_us = 1000: still on the loop
        for _ in range(60):
            plane.infer(request, "test", entry)
        assert not plane.runs_inline(request, 1000.0, entry)  # the slow model has left the loop
    finally:
        runtime.infer = real_infer
    text = plane.metrics.exposition().decode()  # the histogram has every run as it was
    assert 'edged_inference_duration_seconds_bucket{le="0.001",model="tiny",runtime="onnx",version="1.0.0"} 0.0' in text
