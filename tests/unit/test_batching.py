"""Dynamic batching (edged.batching) on a real registry and real onnxruntime models.

Batches are made deterministic by their settings, never by timing: a long
max_queue_delay_us with exactly max_batch_size concurrent requests forms one full batch.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edged.bundle import Manifest, write_bundle
from edged.config import Config, ModelSettings, load_config
from edged.errors import ConfigError, InvalidInput, ModelNotReady, Overloaded
from edged.metrics import Metrics
from edged.registry import ModelRegistry, ModelState
from edged.tensors import TensorSpec
from tests.unit.tiny_model import WEIGHTS, write_tiny_bundle

LONG_US = 600_000_000  # a batch never goes for its delay within a test: only when full
WAIT_S = 120.0  # bound for a thread that should finish (reached only on a hang)


def _onnx_bundle(dest: Path, name: str, nodes, inputs, outputs, samples: dict) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = dest.parent / f".{name}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(source))
    dtype = {1: "float32", 7: "int64"}
    manifest = Manifest(
        name=name, version="1.0.0", runtime="onnx", model_file="model.onnx",
        inputs=[TensorSpec(n, dtype[t], tuple(-1 if isinstance(d, str) else d for d in s)) for n, t, s in inputs],
        outputs=[TensorSpec(n, dtype[t], tuple(-1 if isinstance(d, str) else d for d in s)) for n, t, s in outputs],
    )
    write_bundle(dest, manifest, {"model.onnx": source}, samples, {})
    source.unlink()


def _gather_bundle(dest: Path) -> None:
    """y = data[i, idx[i]]: an index out of range fails in onnxruntime, not in validation."""
    from onnx import TensorProto, helper

    _onnx_bundle(dest, "gather", [helper.make_node("GatherElements", ["data", "idx"], ["y"], axis=1)],
                 [("data", TensorProto.FLOAT, ["N", 4]), ("idx", TensorProto.INT64, ["N", 1])],
                 [("y", TensorProto.FLOAT, ["N", 1])],
                 {"data": np.ones((1, 4), np.float32), "idx": np.zeros((1, 1), np.int64)})


def _double_bundle(dest: Path) -> None:
    """y = 2x with x of any width: requests of different widths must not merge."""
    from onnx import TensorProto, helper

    _onnx_bundle(dest, "double", [helper.make_node("Add", ["x", "x"], ["y"])],
                 [("x", TensorProto.FLOAT, ["N", "W"])], [("y", TensorProto.FLOAT, ["N", "W"])],
                 {"x": np.ones((1, 3), np.float32)})


def _fixed_bundle(dest: Path) -> None:
    from onnx import TensorProto, helper

    _onnx_bundle(dest, "fixed", [helper.make_node("Add", ["x", "x"], ["y"])],
                 [("x", TensorProto.FLOAT, [1, 4])], [("y", TensorProto.FLOAT, [1, 4])],
                 {"x": np.ones((1, 4), np.float32)})


def _registry(tmp_path: Path, models: dict[str, ModelSettings], **kw) -> ModelRegistry:
    config = Config(models_dir=str(tmp_path / "models"), state_dir=str(tmp_path / "state"), models=models, **kw)
    registry = ModelRegistry(config, Metrics())
    registry.load_initial()
    return registry


def _concurrently(call, args: list) -> list:
    """Run ``call(arg)`` in one thread per arg; each result or the exception it raised."""
    results: list = [None] * len(args)

    def work(i: int) -> None:
        try:
            results[i] = call(args[i])
        except Exception as exc:  # the test looks at which requests failed
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    if any(t.is_alive() for t in threads):
        raise AssertionError("a batched request did not finish")
    return results


def _histogram(registry: ModelRegistry, metric: str, model: str) -> dict[str, float]:
    text = registry.metrics.exposition().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(metric) and f'model="{model}"' in line:
            found[line.split("{")[0].removeprefix(metric)] = float(line.rsplit(" ", 1)[1])
    return found


def test_concurrent_requests_form_one_batch_with_the_unbatched_outputs(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=4, max_queue_delay_us=LONG_US)})
    entry = registry.get("tiny")
    xs = [np.random.RandomState(i).rand(1, 4).astype(np.float32) for i in range(4)]
    done = _concurrently(entry.batcher.infer, [{"input": x} for x in xs])
    for x, result in zip(xs, done):
        assert result.batch_rows == 4
        alone = entry.model.infer({"input": x})["y"]
        assert np.array_equal(result.outputs["y"], alone)  # onnxruntime gives the same bits for a row in a batch
        np.testing.assert_allclose(result.outputs["y"], x @ WEIGHTS, rtol=1e-5)
    rows = _histogram(registry, "edged_batch_size", "tiny")
    assert rows["_count"] == 1 and rows["_sum"] == 4
    assert entry.served == 4 and entry.errors == 0
    assert entry.typical_latency_s is None  # a batched model never runs on the event loop
    registry.unload_all()


def test_different_non_batch_dims_are_not_merged(tmp_path):
    _double_bundle(tmp_path / "models" / "double")
    registry = _registry(tmp_path, {"double": ModelSettings(max_batch_size=2, max_queue_delay_us=LONG_US)})
    entry = registry.get("double")
    requests = [{"x": np.full((1, width), i, np.float32)} for i, width in enumerate((3, 5, 3, 5))]
    done = _concurrently(entry.batcher.infer, requests)
    for request, result in zip(requests, done):
        assert result.batch_rows == 2
        assert np.array_equal(result.outputs["y"], 2 * request["x"])
    assert _histogram(registry, "edged_batch_size", "double")["_count"] == 2
    registry.unload_all()


def test_rows_add_up_to_max_batch_size_and_a_larger_request_runs_alone(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=4, max_queue_delay_us=LONG_US)})
    entry = registry.get("tiny")
    big = np.random.RandomState(5).rand(6, 4).astype(np.float32)
    requests = [{"input": big[:3]}, {"input": big[3:4]}]  # 3 + 1 rows fill the batch of 4
    done = _concurrently(entry.batcher.infer, requests)
    assert [r.batch_rows for r in done] == [4, 4]
    assert np.array_equal(np.concatenate([r.outputs["y"] for r in done]), entry.model.infer({"input": big[:4]})["y"])
    alone = entry.batcher.infer({"input": big})  # 6 rows > max_batch_size: not merged, not refused
    assert alone.batch_rows == 6 and alone.outputs["y"].shape == (6, 3)
    with pytest.raises(InvalidInput, match="different batch sizes"):
        _gather_batcher(tmp_path).infer({"data": np.ones((2, 4), np.float32), "idx": np.zeros((1, 1), np.int64)})
    registry.unload_all()


def _gather_batcher(tmp_path: Path):
    _gather_bundle(tmp_path / "g" / "models" / "gather")
    return _registry(tmp_path / "g", {"gather": ModelSettings(max_batch_size=2)}).get("gather").batcher


def test_a_preferred_batch_size_goes_without_waiting_for_the_delay(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    settings = ModelSettings(max_batch_size=8, preferred_batch_sizes=[2], max_queue_delay_us=LONG_US)
    registry = _registry(tmp_path, {"tiny": settings})
    entry = registry.get("tiny")
    done = _concurrently(entry.batcher.infer, [{"input": np.ones((1, 4), np.float32)}] * 2)
    assert [r.batch_rows for r in done] == [2, 2]  # finished: the 600 s delay was not waited for
    registry.unload_all()


def test_batching_a_model_without_a_dynamic_batch_dim_fails_its_load(tmp_path):
    _fixed_bundle(tmp_path / "models" / "fixed")
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"fixed": ModelSettings(max_batch_size=4)})
    entry = registry.get("fixed")
    assert entry.state is ModelState.FAILED
    assert "max_batch_size = 4 in [models.fixed] needs a dynamic batch dimension" in entry.reason
    assert "input x has shape [1, 4]" in entry.reason
    assert registry.get("tiny").ready and registry.get("tiny").batcher is None  # no table: no batching
    registry.unload_all()


def test_models_tables_in_edged_toml(tmp_path):
    path = tmp_path / "edged.toml"
    path.write_text('[models.digits-onnx]\nmax_batch_size = 8\npreferred_batch_sizes = [4, 8]\n'
                    'max_queue_delay_us = 500\n')
    config = load_config(path, environ={})
    settings = config.model_settings("digits-onnx")
    assert (settings.max_batch_size, settings.preferred_batch_sizes, settings.max_queue_delay_us) == (8, [4, 8], 500)
    assert settings.batching and not config.model_settings("other").batching


@pytest.mark.parametrize("table, message", [
    ("max_batch_size = 1", "max_batch_size must be 0 (no batching) or at least 2, got 1"),
    ("max_batch_size = -2", "max_batch_size must be 0 (no batching) or at least 2"),
    ("max_batch_size = 4\npreferred_batch_sizes = [2, 8]", "preferred_batch_sizes must be between 1 and max_batch_size (4), got [8]"),
    ("preferred_batch_sizes = [2]", "preferred_batch_sizes needs max_batch_size of at least 2"),
    ("max_batch_size = 4\nmax_queue_delay_us = -1", "max_queue_delay_us must be 0 or more"),
    ("max_batch_size = \"four\"", "key models.m.max_batch_size: expected an integer"),
    ("preferred_batch_sizes = 4", "expected a list of integers"),
    ("max_batch = 4", "key models.m.max_batch is unknown; known keys: max_batch_size, max_queue_delay_us, preferred_batch_sizes"),
])
def test_bad_models_tables_name_the_key(tmp_path, table, message):
    path = tmp_path / "edged.toml"
    path.write_text(f"[models.m]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_reload_hands_new_requests_to_the_new_batcher_and_an_unload_refuses_them(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=2, max_queue_delay_us=0)})
    entry = registry.get("tiny")
    old = entry.batcher
    x = {"input": np.ones((1, 4), np.float32)}
    registry.load("tiny")  # reload: a new model and a new batcher
    assert entry.batcher is not old and entry.ready
    np.testing.assert_allclose(old.infer(x).outputs["y"], x["input"] @ WEIGHTS, rtol=1e-5)  # went to the new one
    registry.unload("tiny")
    with pytest.raises(ModelNotReady):
        old.infer(x)


def test_more_waiting_requests_than_max_queue_are_refused(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    registry = _registry(tmp_path, {"tiny": ModelSettings(max_batch_size=8, max_queue_delay_us=1_000_000)}, max_queue=2)
    batcher = registry.get("tiny").batcher
    x = {"input": np.ones((1, 4), np.float32)}
    waiting = [batcher.submit(x), batcher.submit(x)]  # the batch waits for 6 more, or for its 1 s delay
    with pytest.raises(Overloaded, match="2 requests waiting to be batched"):
        batcher.submit(x)
    assert [f.result(WAIT_S).batch_rows for f in waiting] == [2, 2]
    registry.unload_all()


def test_a_batch_past_its_preferred_size_sends_that_size_and_the_rest_forms_the_next(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    settings = ModelSettings(max_batch_size=8, preferred_batch_sizes=[2], max_queue_delay_us=LONG_US)
    registry = _registry(tmp_path, {"tiny": settings}, max_concurrency=1)
    entry = registry.get("tiny")
    xs = [{"input": np.full((1, 4), i, np.float32)} for i in range(4)]
    entry.acquire()  # the only slot is busy: the batch keeps filling past 2
    first = [entry.batcher.submit(x) for x in xs[:3]]
    entry.release()  # 2 go (the preferred size), the third starts the next batch
    last = entry.batcher.submit(xs[3])  # and makes it 2: it goes without waiting the delay
    done = [f.result(WAIT_S) for f in first + [last]]
    assert [r.batch_rows for r in done] == [2, 2, 2, 2]
    for x, result in zip(xs, done):
        np.testing.assert_allclose(result.outputs["y"], x["input"] @ WEIGHTS, rtol=1e-5)
    registry.unload_all()
