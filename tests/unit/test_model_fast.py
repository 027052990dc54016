"""The request path's shortcuts decide as the long way does: a model's remembered
input shapes (LoadedModel.infer), a model version's slots (ModelEntry.acquire and
release) and the newest-version lookup (ModelRegistry.get)."""

import threading

import numpy as np
import pytest

from edged.config import Config
from edged.errors import InvalidInput, Overloaded
from edged.metrics import Metrics
from edged.model import KNOWN_SHAPES, LoadedModel
from edged.model_entry import ModelEntry, ModelState
from edged.registry import ModelRegistry
from edged.runtimes import RuntimeOptions
from tests.unit.tiny_model import WEIGHTS, write_tiny_bundle


@pytest.fixture()
def model(tmp_path):
    loaded = LoadedModel.load(write_tiny_bundle(tmp_path / "tiny"), RuntimeOptions(threads=1))
    yield loaded
    loaded.unload()


def test_a_shape_that_passed_is_run_at_once_and_bad_inputs_are_still_refused(model):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for _ in range(3):
        np.testing.assert_allclose(model.infer({"input": x})["y"], x @ WEIGHTS, rtol=1e-5)
    with pytest.raises(InvalidInput, match="expected dtype"):
        model.infer({"input": x.astype(np.int32)})
    with pytest.raises(InvalidInput, match="expected shape"):
        model.infer({"input": np.zeros((2, 5), np.float32)})
    with pytest.raises(InvalidInput, match="unknown input"):
        model.infer({"input": x, "extra": x})
    with pytest.raises(InvalidInput, match="missing input"):
        model.infer({})
    for rows in range(1, KNOWN_SHAPES + 5):  # more shapes than are remembered: each still runs
        assert model.infer({"input": np.ones((rows, 4), np.float32)})["y"].shape == (rows, 3)
    assert len(model._known["input"][1]) <= KNOWN_SHAPES
    assert list(model.infer({"input": x})) == ["y"]


def _entry(**kwargs) -> ModelEntry:
    entry = ModelEntry(name="m", version="1.0.0", source=None, **kwargs)  # type: ignore[arg-type]
    entry.model, entry.state = object(), ModelState.READY  # type: ignore[assignment]
    return entry


def test_a_free_slot_is_taken_without_waiting_and_a_full_entry_queues_then_refuses():
    entry = _entry(max_concurrency=1, max_queue=1)
    _, waited = entry.acquire()
    assert waited == 0.0 and entry.pending == 1
    got: list[float] = []
    queued = threading.Thread(target=lambda: got.append(entry.acquire()[1]))
    queued.start()
    for _ in range(500):  # until it waits for the slot
        if entry.pending == 2:
            break
        threading.Event().wait(0.01)
    assert entry.pending == 2
    with pytest.raises(Overloaded, match="limit of 1 running and 1 queued"):
        entry.acquire()
    entry.release(ok=True, seconds=0.002)
    queued.join(10)
    assert got and got[0] > 0.0  # it waited for the slot
    assert (entry.served, entry.errors, entry.typical_latency_s, entry.pending) == (1, 0, 0.002, 1)
    entry.release(ok=False, seconds=0.004)
    assert (entry.served, entry.errors, entry.pending) == (2, 1, 0)
    assert entry.typical_latency_s == pytest.approx(0.9 * 0.002 + 0.1 * 0.004)
    assert entry.wait_idle(timeout=5.0)


def test_wait_idle_returns_when_the_last_request_is_done():
    entry = _entry(max_concurrency=2)
    entry.acquire()
    entry.acquire()
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(entry.wait_idle(timeout=30.0)))
    waiter.start()
    entry.release()
    assert not done
    entry.release()
    waiter.join(30)
    assert done == [True]
    assert entry.wait_idle(timeout=0.0)  # idle already: no wait


def test_the_newest_ready_version_answers_unversioned_lookups(tmp_path):
    models = tmp_path / "models"
    write_tiny_bundle(models / "a", version="1.0.0")
    write_tiny_bundle(models / "b", version="1.10.0")
    write_tiny_bundle(models / "c", version="1.9.0")
    config = Config(models_dir=str(models), state_dir=str(tmp_path / "state"), versions="all")
    registry = ModelRegistry(config, Metrics())
    registry.load_initial()
    try:
        assert registry.get("tiny").version == "1.10.0"  # semver order, not text order
        assert registry.get("tiny", "1.9.0").version == "1.9.0"
        registry._unload_entry(registry.get("tiny", "1.10.0"))
        assert registry.get("tiny").version == "1.9.0"  # the newest that is ready
        with pytest.raises(Exception, match="has no version '2.0.0'; versions: 1.0.0, 1.9.0, 1.10.0"):
            registry.get("tiny", "2.0.0")
    finally:
        registry.unload_all()
