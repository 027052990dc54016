"""Which float twins a TFLite attempt can fall back to: those of the route
that built it (onnx2tf writes fp16 and fp32 twins; the MLP writer writes
int8 only). The twins are shared by the int8 converter and its variants, so
a fallback and the fp32 baseline reuse the int8 run's files. No conversion
runs here (tests/e2e/test_convert_tflite_fallback.py converts)."""

from __future__ import annotations

from pathlib import Path

from converters import tune
from converters.pipeline import Attempt
from converters.tflite_onnx2tf import FLOAT_PRECISIONS, OnnxTFConverter


def test_tflite_fallback_precisions_come_from_the_route():
    int8 = OnnxTFConverter(per_channel=False)
    onnx2tf_attempt = Attempt("int8", Path("."), {}, int8)
    assert tune.float_precisions("tflite", onnx2tf_attempt) == list(FLOAT_PRECISIONS) == ["fp16", "fp32"]
    assert tune.float_precisions("tflite") == []
    from converters.tflite_int8 import TFLiteInt8Converter

    writer_attempt = Attempt("int8", Path("."), {}, TFLiteInt8Converter())
    assert tune.float_precisions("tflite", writer_attempt) == []
    assert tune.float_precisions("openvino", writer_attempt) == ["fp16", "fp32"]


def test_float_variants_share_the_int8_runs_twins(tmp_path):
    int8 = OnnxTFConverter(per_channel=False, timeout_s=60)
    attempt = Attempt("int8", tmp_path, {}, int8)
    fp16 = tune.float_converter("tflite", "fp16", attempt)
    assert isinstance(fp16, OnnxTFConverter) and fp16.precision == "fp16"
    assert fp16.per_channel is False and fp16.timeout_s == 60
    twin = tmp_path / "model_fp32.tflite"
    int8.float_files["fp32"] = twin  # what an int8 run keeps
    fp32 = fp16.float_variant("fp32")  # a variant of a variant still sees it
    assert fp32.precision == "fp32" and fp32.float_files.get("fp32") == twin
