"""Accuracy-aware int8 and automatic precision, piece by piece: the gate
margin, the node ranking on a graph with a known weak spot, the decision
rule, the same-runtime speed line, interleaved timing through LoadedModel,
and profiles that ask for ``auto``. No timing is asserted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from converters import precision, tune
from converters.data import ModelInput, as_samples
from edged import profiles
from edged.profiles import ProfileError, load_profile


def _report(metric: str, value: float, threshold: float, collapsed: bool = False, size: int = 1000) -> dict:
    passed = value <= threshold if metric == "top1" else value >= threshold
    report = {"gate": {"passed": passed and not collapsed,
                       "verdicts": [{"output": "y", "metric": metric, "value": value, "threshold": threshold,
                                     "passed": passed, "text": f"y: {metric} {value}"}]},
              "size_bytes": {"converted": size}}
    if collapsed:
        report["collapsed"] = ["y: constant output"]
    return report


@dataclass
class FakeAttempt:
    label: str
    report: dict
    staged: Path = Path(".")

    @property
    def passed(self) -> bool:
        return bool(self.report["gate"]["passed"]) and not self.report.get("collapsed")


def test_margin_is_signed_by_the_gate_and_collapse_is_worst():
    assert tune.margin(_report("cosine", 0.99, 0.97)) > 0 > tune.margin(_report("cosine", 0.90, 0.97))
    assert tune.margin(_report("sqnr_db", 25.0, 20.0)) > 0 > tune.margin(_report("sqnr_db", 6.0, 20.0))
    assert tune.margin(_report("top1", 0.5, 1.0)) > 0 > tune.margin(_report("top1", 12.5, 1.0))
    # closer to the threshold ranks higher, so tuning keeps the better settings
    assert tune.margin(_report("sqnr_db", 11.0, 20.0)) > tune.margin(_report("sqnr_db", 6.0, 20.0))
    assert tune.margin(_report("cosine", 0.999, 0.97, collapsed=True)) == float("-inf")


def test_float_node_sets_grow_by_doubling_up_to_all():
    assert list(tune._growth(9)) == [1, 2, 4, 8, 9]
    assert list(tune._growth(8)) == [1, 2, 4, 8]
    assert list(tune._growth(1)) == [1]


def test_float_precisions_per_runtime():
    assert tune.float_precisions("openvino") == ["fp16", "fp32"]
    assert tune.float_precisions("onnx")[-1] == "fp32"
    assert tune.float_precisions("tflite") == []


def _log_model(path: Path) -> Path:
    """x -> MatMul -> square -> +eps -> Log -> y: int8 of the squared values
    (a power spectrum) zeroes the small ones and the Log blows them up."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.RandomState(0).randn(16, 16).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="proj"),
        helper.make_node("Mul", ["m", "m"], ["power"], name="square"),
        helper.make_node("Add", ["power", "eps"], ["power_eps"], name="floor"),
        helper.make_node("Log", ["power_eps"], ["y"], name="log"),
    ]
    graph = helper.make_graph(
        nodes, "logpower", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(1e-6, np.float32), "eps")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _wide_range_samples(n: int = 24):
    rng = np.random.RandomState(1)
    x = (rng.randn(n, 1, 16) * np.exp(rng.uniform(-6, 3, (n, 1, 1)))).astype(np.float32)
    return as_samples(x, [ModelInput("x", (1, 16))])


def test_sensitivity_names_the_log_and_what_feeds_it(tmp_path):
    pytest.importorskip("onnxruntime")
    from converters.onnx_qdq import QuantOptions, prepare_float_model, quantize_prepared
    from converters.sensitivity import rank_nodes

    samples = _wide_range_samples()
    prepared = prepare_float_model(_log_model(tmp_path / "m.onnx"), tmp_path)
    quantize_prepared(prepared, tmp_path / "q.onnx", samples, QuantOptions())
    ranking = rank_nodes(prepared, tmp_path / "q.onnx", samples.head(8), tmp_path / "dbg")
    worst = ranking.losses[0]
    assert worst.node == "log" and worst.sqnr_out_db < worst.sqnr_in_db
    order = ranking.float_node_order()
    assert order[0] == "log" and "floor" in order[:3]  # the Add that quantizes the Log's input comes next
    assert "log" in ranking.reason("log") and "log" in ranking.reason("floor")


def test_nodes_kept_in_float_are_not_quantized(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from converters.onnx_qdq import QuantOptions, prepare_float_model, quantize_prepared

    samples = _wide_range_samples()
    prepared = prepare_float_model(_log_model(tmp_path / "m.onnx"), tmp_path)
    plain, kept = tmp_path / "plain.onnx", tmp_path / "kept.onnx"
    quantize_prepared(prepared, plain, samples, QuantOptions())
    quantize_prepared(prepared, kept, samples, QuantOptions(nodes_to_exclude=("floor", "log", "square")))

    def quantized_tensors(path: Path) -> set[str]:
        return {n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}

    assert "power_eps" in quantized_tensors(plain) and "power_eps" not in quantized_tensors(kept)
    assert quantized_tensors(kept)  # the MatMul stays int8


def test_auto_keeps_the_fastest_passing_and_ties_go_to_the_smaller():
    fp32 = FakeAttempt("fp32", _report("cosine", 1.0, 0.97, size=4000))
    int8 = FakeAttempt("int8", _report("cosine", 0.99, 0.97, size=1000))
    failed = FakeAttempt("int8 bad", _report("cosine", 0.5, 0.97, size=900))
    timed = {"fp32": {"p50": 1.0}, "int8": {"p50": 2.0}, "int8 bad": {"p50": 0.1}}
    chosen, why = precision._pick([fp32, int8], timed, "onnx")
    assert chosen is fp32 and "fastest" in why
    timed["int8"]["p50"] = 1.01  # within the tie margin: the smaller bundle
    chosen, why = precision._pick([fp32, int8], timed, "onnx")
    assert chosen is int8 and "smaller" in why
    assert failed not in (precision._pick([fp32, int8], timed, "onnx")[0],)


def test_speed_line_only_when_int8_is_not_faster_than_fp32_on_the_same_runtime():
    options = precision.runtime_options(profiles.get_profile("generic-x86"), "onnx")
    for int8_p50, says in ((2.0, True), (1.0, True), (0.5, False)):
        int8 = FakeAttempt("int8", {**_report("cosine", 0.99, 0.97), "precision": "int8"})
        fp32 = FakeAttempt("fp32", {**_report("cosine", 1.0, 0.97), "precision": "fp32"})
        timed = {"int8": {"p50": int8_p50, "p90": int8_p50, "calls": 3}, "fp32": {"p50": 1.0, "p90": 1.0, "calls": 3}}
        precision._same_runtime(int8, timed, fp32, "onnx", options, auto=False)
        block = int8.report["latency_same_runtime"]
        assert block["runtime"] == "onnx" and block["chosen_vs_fp32"] == int8_p50
        assert ("speed_note" in int8.report) == says
        if says:
            assert "onnxruntime" in int8.report["speed_note"] and "--precision auto would ship fp32" in \
                int8.report["speed_note"]


def test_interleaved_timing_runs_every_bundle_through_loaded_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from tests.unit.tiny_model import write_tiny_bundle

    a, b = write_tiny_bundle(tmp_path / "a"), write_tiny_bundle(tmp_path / "b")
    samples = as_samples(np.random.RandomState(0).rand(4, 1, 4).astype(np.float32), [ModelInput("input", (-1, 4))])
    timed = precision.time_interleaved({"a": a.root, "b": b.root}, samples,
                                       precision.runtime_options(profiles.get_profile("generic-x86"), "onnx"),
                                       budget_s=0.05)
    assert set(timed) == {"a", "b"}
    assert timed["a"]["calls"] == timed["b"]["calls"] >= precision.ROUNDS * precision.MIN_CALLS
    assert all(t["p90"] >= t["p50"] > 0 for t in timed.values())


def test_profile_threads_reach_the_runtime_options():
    opts = precision.runtime_options(profiles.get_profile("rpi4"), "onnx")
    assert opts.threads == 4 and "per_channel" not in opts.extra and opts.extra["providers"]


def test_x86_profiles_default_to_auto_and_auto_is_only_a_precision(tmp_path):
    found = profiles.all_profiles()
    assert found["generic-x86"].precision == "auto" and found["intel-x86"].precision == "auto"
    assert found["rpi4"].precision == "int8"
    good = tmp_path / "auto-box.toml"
    good.write_text('name = "auto-box"\n[runtime]\npreference = ["onnx"]\nprecision = "auto"\n')
    assert load_profile(good).precision == "auto"
    bad = tmp_path / "bad-box.toml"
    bad.write_text('name = "bad-box"\n[runtime]\npreference = ["onnx"]\nprecision = "int4"\n')
    with pytest.raises(ProfileError, match="runtime.precision must be one of int8, fp16, fp32, auto"):
        load_profile(bad)
    fallback = tmp_path / "fb-box.toml"
    fallback.write_text('name = "fb-box"\n[runtime]\npreference = ["onnx"]\nfallback_precision = "auto"\n')
    with pytest.raises(ProfileError, match="fallback_precision"):
        load_profile(fallback)
