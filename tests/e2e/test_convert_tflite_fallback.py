"""The TFLite accuracy fallback and same-runtime baseline of the onnx2tf route,
through `edged convert --profile rpi4` on a real model: openWakeWord's mel
front-end (from the corpus), whose int8 TFLite misses the default SQNR gate
(the power spectrum before a Log). Only decisions are asserted: which
precision was shipped, the report's reasons and metrics, what the timing
compared -- never a latency value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converters import onnx_tf
from edged.bundle import open_bundle

pytestmark = pytest.mark.slow
EDGED = [sys.executable, "-m", "edged.cli"]


@pytest.fixture(scope="module")
def melspec(tmp_path_factory):
    if not onnx_tf.available():
        pytest.skip(f"{onnx_tf.venv_dir()} is missing: `make install-tf` creates it")
    from tests.corpus import data, models

    model = models.get("oww_melspec")
    try:
        path = model.path()
    except Exception as exc:  # the wheel could not be fetched here
        pytest.skip(f"corpus model oww_melspec unavailable: {exc}")
    calib, holdout = data.write_split("oww_melspec", tmp_path_factory.mktemp("melspec"), 16, 8, 0)
    return path, calib, holdout


def convert(melspec, out: Path, *extra: str) -> subprocess.CompletedProcess:
    path, calib, holdout = melspec
    args = [*EDGED, "convert", str(path), "--profile", "rpi4", "--calib", str(calib), "--holdout", str(holdout),
            "--task", "regress", "--latency-runs", "10", "-o", str(out), "--name", "mel", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=1200)  # only a hang reaches it


def report_of(bundle: Path) -> dict:
    return json.loads((open_bundle(bundle).root / "report.json").read_text())


def test_int8_missing_the_gate_falls_back_to_a_float_tflite_and_says_why(melspec, tmp_path):
    proc = convert(melspec, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(tmp_path / "out" / "mel")
    manifest = open_bundle(tmp_path / "out" / "mel").manifest
    assert manifest.runtime == "tflite" and report["runtime"] == "tflite"
    assert report["precision"] in ("fp16", "fp32") and manifest.provenance["precision"] == report["precision"]
    assert report["route"] == "tflite-onnx2tf" and report["gate"]["passed"]
    steps = report["tuning"]
    assert steps[0]["step"] == "int8" and not steps[0]["passed"] and steps[0]["verdicts"]
    fallbacks = [s for s in steps if s["step"].startswith("fallback")]
    assert [s["precision"] for s in fallbacks][:1] == ["fp16"]  # fp16 is tried first
    assert fallbacks[-1]["passed"] and fallbacks[-1]["precision"] == report["precision"]
    fallback = report["fallback"]
    assert fallback["from"] == "int8" and fallback["to"] == report["precision"] and fallback["runtime"] == "tflite"
    assert fallback["int8"] == steps[0]["verdicts"] and "SQNR" in fallback["int8"][0]
    assert "fell back to" in report["tuning_result"] and steps[0]["verdicts"][0] in report["tuning_result"]
    assert "fell back to" in proc.stderr
    same = report["latency_same_runtime"]
    assert same["runtime"] == "tflite" and "fp32" in same and "chosen_vs_fp32" in same


def test_int8_passing_is_timed_against_the_fp32_tflite_twin(melspec, tmp_path):
    # a gate int8 meets (SQNR 3 dB): the int8 bundle ships, timed against the fp32 TFLite the same
    # onnx2tf run wrote, on edged's TFLite runtime
    proc = convert(melspec, tmp_path / "out", "--gate-threshold", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(tmp_path / "out" / "mel")
    assert report["precision"] == "int8" and "tuning" not in report and "fallback" not in report
    same = report["latency_same_runtime"]
    assert same["runtime"] == "tflite" and same["chosen"]["label"] == "int8"
    assert same["fp32"]["calls"] == same["chosen"]["calls"] > 0  # the same interleaved rounds
    assert same["int8_vs_fp32"] == same["chosen_vs_fp32"]
    assert ("speed_note" in report) == (same["int8_vs_fp32"] >= 1.0)
    if "speed_note" in report:
        assert "fp32 on TFLite" in report["speed_note"]


def test_auto_on_a_tflite_profile_builds_the_float_twins_as_candidates(melspec, tmp_path):
    proc = convert(melspec, tmp_path / "out", "--precision", "auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = report_of(tmp_path / "out" / "mel")
    auto = report["precision_auto"]
    rows = {row["label"]: row for row in auto["candidates"]}
    assert {"int8", "fp16", "fp32"} <= set(rows)
    assert all(row["latency_ms"]["calls"] > 0 for row in rows.values())  # timed on TFLite, interleaved
    assert rows[auto["chosen"]]["passed"] and report["gate"]["passed"] and report["runtime"] == "tflite"
    assert report["precision"] == rows[auto["chosen"]]["precision"]
    assert report["latency_same_runtime"]["runtime"] == "tflite"
