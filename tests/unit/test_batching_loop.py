"""Dynamic batches formed and run on an event loop (edged.batching_loop), on a real
registry and real onnxruntime models. As in test_batching, batches are made
deterministic by their settings, never by timing: requests submitted in one loop step
with a long max_queue_delay_us and exactly max_batch_size rows form one full batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from edged.batching_loop import LOOP_MAX_BYTES, fits_loop
from edged.config import ModelSettings
from edged.errors import InferenceFailed, InvalidInput, Overloaded
from tests.unit.test_batching import LONG_US, _concurrently, _double_bundle, _gather_bundle, _histogram, _registry
from tests.unit.tiny_model import WEIGHTS, write_tiny_bundle

INLINE_US = 200.0  # http.inline_max_us's default
WAIT_S = 120.0  # bound on a batch that should finish (reached only on a hang)


def _on_loop(submit, requests: list, inline_max_us: float = INLINE_US) -> list:
    """``submit(inputs, inline_max_us)`` for every request in one step of a fresh event
    loop; each result or the exception it raised."""
    async def main() -> list:
        async def one(inputs):
            return await submit(inputs, inline_max_us)
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests), return_exceptions=True), WAIT_S)
    return asyncio.run(main())


def _threads_running(model) -> list[int]:
    """Record the thread of each runtime call of ``model`` (the real call still runs)."""
    threads: list[int] = []
    infer = model.infer

    def recorded(inputs):
        threads.append(threading.get_ident())
        return infer(inputs)

    model.infer = recorded
    return threads


def test_requests_on_one_loop_form_one_batch_run_there_with_the_unbatched_outputs(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=4, max_queue_delay_us=LONG_US)})
    entry = registry.get("tiny")
    xs = [np.random.RandomState(i).rand(1, 4).astype(np.float32) for i in range(4)]
    alone = [entry.model.infer({"input": x})["y"] for x in xs]
    ran_in = _threads_running(entry.model)
    done = _on_loop(entry.batcher.submit_async, [{"input": x} for x in xs])
    assert ran_in == [threading.get_ident()]  # one runtime call, on the loop's thread
    for x, want, result in zip(xs, alone, done):
        assert result.batch_rows == 4
        assert np.array_equal(result.outputs["y"], want)  # exact: onnxruntime computes a row in a batch as alone
        np.testing.assert_allclose(result.outputs["y"], x @ WEIGHTS, rtol=1e-5)
    rows = _histogram(registry, "edged_batch_size", "tiny")
    assert rows["_count"] == 1 and rows["_sum"] == 4  # one batch of 4
    assert _histogram(registry, "edged_batch_requests", "tiny")["_sum"] == 4
    assert entry.served == 4 and entry.errors == 0
    registry.unload_all()


def test_with_no_delay_the_requests_of_one_loop_step_join_one_batch(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=8, max_queue_delay_us=0)})
    entry = registry.get("tiny")
    xs = [np.full((1, 4), i, np.float32) for i in range(3)]
    done = _on_loop(entry.batcher.submit_async, [{"input": x} for x in xs])
    assert [r.batch_rows for r in done] == [3, 3, 3]  # not full, yet not waited for: the step's requests
    for x, result in zip(xs, done):
        np.testing.assert_allclose(result.outputs["y"], x @ WEIGHTS, rtol=1e-5)
    registry.unload_all()


def _in_batches(path: str, entry, requests: list) -> list:
    """Each request's result (or exception) from concurrent requests to ``entry``'s batcher:
    on worker threads (``Batcher.infer`` from one thread per request), or on an event loop."""
    if path == "threads":
        return _concurrently(entry.batcher.infer, requests)
    return _on_loop(entry.batcher.submit_async, requests)


@pytest.mark.parametrize("path", ["threads", "loop"])
def test_a_bad_request_fails_alone(tmp_path, path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=3, max_queue_delay_us=LONG_US)})
    entry = registry.get("tiny")
    good = [{"input": np.full((1, 4), i, np.float32)} for i in range(3)]
    bad = [{"input": np.ones((1, 5), np.float32)}, {"input": np.ones((1, 4), np.int32)}, {"wrong": np.ones((1, 4), np.float32)}]
    done = _in_batches(path, entry, good[:1] + bad + good[1:])
    assert [type(r).__name__ for r in done[1:4]] == ["InvalidInput"] * 3
    for request, result in zip(good, done[:1] + done[4:]):
        assert result.batch_rows == 3
        np.testing.assert_allclose(result.outputs["y"], request["input"] @ WEIGHTS, rtol=1e-5)
    registry.unload_all()


@pytest.mark.parametrize("path", ["threads", "loop"])
def test_a_request_that_fails_in_the_runtime_fails_alone(tmp_path, path):
    _gather_bundle(tmp_path / "models" / "gather")
    registry = _registry(tmp_path, {"gather": ModelSettings(max_batch_size=3, max_queue_delay_us=LONG_US)})
    entry = registry.get("gather")
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    requests = [{"data": data[i:i + 1], "idx": np.array([[i]], np.int64)} for i in range(3)]
    requests[1]["idx"] = np.array([[7]], np.int64)  # out of range: onnxruntime refuses the whole call
    done = _in_batches(path, entry, requests)
    assert isinstance(done[1], InferenceFailed) and "GatherElements" in str(done[1])
    assert done[0].outputs["y"].tolist() == [[0.0]] and done[2].outputs["y"].tolist() == [[10.0]]
    assert entry.errors == 1 and entry.served == 3
    registry.unload_all()


def test_which_requests_batch_on_the_loop(tmp_path):
    _double_bundle(tmp_path / "models" / "double")
    registry = _registry(tmp_path, {"double": ModelSettings(max_batch_size=4, max_queue_delay_us=0)})
    batcher = registry.get("double").batcher
    small = {"x": np.ones((1, 3), np.float32)}
    assert batcher.typical_run_s is not None  # the warm-up run, until batches have run
    assert fits_loop(batcher, small, 1, INLINE_US)
    assert not fits_loop(batcher, small, 1, 0.0)  # http.inline_max_us = 0: never on the loop
    assert not fits_loop(batcher, {"x": np.ones((5, 3), np.float32)}, 5, INLINE_US)  # over max_batch_size
    wide = {"x": np.ones((1, LOOP_MAX_BYTES // 4 + 1), np.float32)}
    assert not fits_loop(batcher, wide, 1, INLINE_US)  # big inputs
    assert not fits_loop(batcher, small, 1, batcher.typical_run_s * 1e6 / 2)  # its batches take longer
    # A request not for the loop is batched by the worker threads, with the same result.
    done = _on_loop(batcher.submit_async, [small, wide], inline_max_us=0.0)
    assert np.array_equal(done[0].outputs["y"], 2 * small["x"]) and np.array_equal(done[1].outputs["y"], 2 * wide["x"])
    registry.unload_all()


def test_more_waiting_requests_than_max_queue_are_refused_on_the_loop(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=8, max_queue_delay_us=200_000)},
                         max_queue=2)
    batcher = registry.get("tiny").batcher
    x = {"input": np.ones((1, 4), np.float32)}
    done = _on_loop(batcher.submit_async, [x, x, x])  # the batch waits for 6 more, or for its 0.2 s delay
    assert isinstance(done[2], Overloaded) and "2 requests waiting to be batched" in str(done[2])
    assert [r.batch_rows for r in done[:2]] == [2, 2]
    registry.unload_all()


def test_a_reload_hands_loop_requests_to_the_new_batcher(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=2, max_queue_delay_us=LONG_US)})
    entry = registry.get("tiny")
    old = entry.batcher
    registry.load("tiny")  # reload: a new model and a new batcher
    x = {"input": np.ones((1, 4), np.float32)}
    done = _on_loop(old.submit_async, [x, x])
    assert [r.batch_rows for r in done] == [2, 2]
    np.testing.assert_allclose(done[0].outputs["y"], x["input"] @ WEIGHTS, rtol=1e-5)
    assert old.typical_run_s is not None and entry.batcher is not old
    registry.unload_all()


def _series(registry, metric: str, **labels: str) -> float:
    """The value of one labelled series in the exposition (0.0 when absent)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in registry.metrics.exposition().decode().splitlines():
        if line.startswith(metric + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_data_plane_answers_loop_batched_requests_by_callback_and_counts_each(tmp_path):
    from edged.dataplane import DataPlane, InferenceRequest, InferenceResponse

    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=3, max_queue_delay_us=LONG_US)})
    plane = DataPlane(registry.config, registry, registry.metrics)
    entry = registry.get("tiny")
    xs = [np.full((1, 4), i, np.float32) for i in range(3)]
    replies: list = []

    async def main() -> list:
        refused = []
        for i, x in enumerate(xs[:2] + [np.ones((1, 5), np.float32)] + xs[2:]):
            request = InferenceRequest(model="tiny", inputs={"input": x}, id=str(i))
            try:
                assert plane.infer_on_loop(request, "http", entry, INLINE_US, replies.append)
            except InvalidInput as exc:  # refused before it joined: raised, not replied
                refused.append(exc)
        return refused

    refused = asyncio.run(main())
    assert len(refused) == 1 and "expected shape" in str(refused[0])
    assert [type(r) for r in replies] == [InferenceResponse] * 3  # the third join filled the batch
    for x, response in zip(xs, sorted(replies, key=lambda r: r.id)):
        np.testing.assert_allclose(response.outputs["y"], x @ WEIGHTS, rtol=1e-5)
    assert _series(registry, "edged_inference_requests_total", model="tiny", transport="http") == 4
    assert _series(registry, "edged_inference_failures_total", model="tiny", transport="http") == 1
    assert _series(registry, "edged_inference_duration_seconds_count", model="tiny") == 3
    assert _series(registry, "edged_queue_depth", model="tiny") == 0
    registry.unload_all()


def test_a_loop_batch_whose_model_grew_slow_runs_in_a_worker_and_comes_back(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=4, max_queue_delay_us=0)})
    entry = registry.get("tiny")
    batcher = entry.batcher
    xs = [np.full((1, 4), i, np.float32) for i in range(2)]
    ran_in = _threads_running(entry.model)

    async def main() -> tuple[list, int]:
        waiting = [batcher.submit_async({"input": x}, INLINE_US) for x in xs]  # both join the loop's batch
        batcher._typical_run_s = 1.0  # the model's batches now take 1 s: too slow for the loop
        return await asyncio.wait_for(asyncio.gather(*waiting), WAIT_S), threading.get_ident()

    done, loop_thread = asyncio.run(main())
    assert len(ran_in) == 1 and ran_in[0] != loop_thread  # one call, in a worker thread
    assert [r.batch_rows for r in done] == [2, 2]
    for x, result in zip(xs, done):
        np.testing.assert_allclose(result.outputs["y"], x @ WEIGHTS, rtol=1e-5)
    registry.unload_all()
