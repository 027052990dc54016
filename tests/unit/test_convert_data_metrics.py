"""converters.data (samples keyed by input name) and converters.metrics
(per-output metrics, task gates, collapse) on arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from converters.data import ModelInput, Samples, as_samples, rename_feed, samples_from_arrays
from converters.errors import BadInput
from converters.metrics import TASKS, collapse_reason, compare_output, judge, pick_task

VAD_INPUTS = [ModelInput("input", (-1, 512)), ModelInput("state", (2, -1, 128)), ModelInput("sr", (), "int64")]


def test_batch_dim_arrays_become_batch_one_samples():
    samples = as_samples(np.zeros((5, 1, 8, 8), np.float32), [ModelInput("x", (-1, 1, 8, 8))])
    assert len(samples) == 5 and samples.sample(0)["x"].shape == (1, 1, 8, 8)
    assert samples.batchable and samples.stacked()["x"].shape == (5, 1, 8, 8)


def test_multi_input_with_state_and_scalar():
    arrays = {"input": np.zeros((4, 1, 512), np.float32), "state": np.zeros((4, 2, 1, 128), np.float32),
              "sr": np.full(4, 16000, np.int64)}
    samples = samples_from_arrays(arrays, VAD_INPUTS, "calib")
    feed = samples.sample(3)
    assert feed["state"].shape == (2, 1, 128) and feed["sr"].shape == () and feed["sr"] == 16000
    assert feed["sr"].dtype == np.int64
    assert not samples.batchable  # state's batch is not dim 0: samples.npz keeps one call


def test_bad_data_names_what_is_wrong():
    arrays = {"input": np.zeros((4, 1, 512), np.float32), "state": np.zeros((4, 2, 1, 128), np.float32)}
    with pytest.raises(BadInput, match="no array for input.*'sr'"):
        samples_from_arrays(arrays, VAD_INPUTS, "calib")
    arrays["sr"] = np.full(3, 16000, np.int64)
    with pytest.raises(BadInput, match="different sample counts"):
        samples_from_arrays(arrays, VAD_INPUTS, "calib")
    arrays["sr"] = np.full(4, 16000.0, np.float32)
    with pytest.raises(BadInput, match="dtype mismatch for input 'sr'"):
        samples_from_arrays(arrays, VAD_INPUTS, "calib")
    with pytest.raises(BadInput, match=r"expected \[N, 1, 8, 8\].*got \[3, 3, 8, 8\]"):
        as_samples(np.zeros((3, 3, 8, 8), np.float32), [ModelInput("x", (-1, 1, 8, 8))])
    with pytest.raises(BadInput, match="NaN"):
        as_samples(np.full((3, 1, 8, 8), np.nan, np.float32), [ModelInput("x", (-1, 1, 8, 8))])


def test_rename_feed_by_name_else_position():
    feed = {"a": np.zeros(1), "b": np.ones(1)}
    assert list(rename_feed(feed, ["b", "a"])) == ["b", "a"]
    assert list(rename_feed(feed, ["serving_0", "serving_1"])) == ["serving_0", "serving_1"]


def test_metrics_of_a_faithful_and_a_collapsed_map():
    rng = np.random.default_rng(1)
    ref = (rng.random((8, 1, 64, 64)) > 0.9).astype(np.float32)  # a text-probability map, 10% marked
    good = ref + rng.normal(0, 0.02, ref.shape)
    m = compare_output("map", ref, good, classify=False)
    assert m.cosine > 0.99 and m.sqnr_db > 20 and m.collapse is None and m.top1_agreement is None
    assert [v.passed for v in judge([m], TASKS["segment"])] == [True]
    collapsed = np.full(ref.shape, 6.7e-7)
    assert "constant output" in collapse_reason(ref, collapsed)
    assert "near-zero variance" in collapse_reason(ref, ref * 1e-4)
    assert "NaN/Inf" in collapse_reason(ref, np.where(ref > 0, np.inf, 0.0))
    assert collapse_reason(np.zeros(4), np.zeros(4)) is None  # constant in fp32 too


def test_offset_error_fails_regress_but_not_by_top1():
    ref = np.linspace(42, 103, 8 * 32).reshape(8, 32)
    shifted = ref - 41.0  # the same order, so argmax agrees
    m = compare_output("mel", ref, shifted, classify=True)
    assert m.top1_agreement == 1.0
    (verdict,) = judge([m], TASKS["regress"])
    assert not verdict.passed and verdict.metric == "sqnr_db"


def test_classifier_gate_uses_accuracy_with_labels():
    ref = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]
    got = ref.copy()
    got[0] = np.eye(4)[1]  # one flip out of 8
    m = compare_output("logits", ref, got, classify=True, labels=np.array([0, 1, 2, 3, 0, 1, 2, 3]))
    (verdict,) = judge([m], TASKS["classify"])
    assert verdict.value == pytest.approx(12.5) and not verdict.passed
    assert judge([m], TASKS["classify"], threshold=20.0)[0].passed
    assert pick_task(None, has_labels=True).name == "classify" and pick_task(None, False).name == "auto"


def test_integer_outputs_are_compared_element_by_element():
    ref = np.array([[3, 0, 7, 7, 0]] * 4, np.int64)  # argmax per CTC step
    got = ref.copy()
    got[0, 0] = 2
    m = compare_output("ids", ref, got, classify=False)
    assert m.match_rate == pytest.approx(19 / 20)
    (verdict,) = judge([m], TASKS["sequence"])
    assert verdict.metric == "match" and verdict.passed
