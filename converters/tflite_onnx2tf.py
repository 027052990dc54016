"""ONNX -> full-integer int8 TFLite through onnx2tf (``converters.onnx_tf``),
as a ``Converter``: the route for graphs the MLP writer does not take (LSTM,
GRU, SpaceToDepth, computed Clip bounds, several inputs). The worker runs in
``build/tf-venv`` (``make install-tf``); this module only wraps its result
into a bundle with the ONNX model as the reference.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import BundleInfo, dist_version, finish_bundle, onnx_model_inputs, onnx_reference
from converters.data import Samples, as_samples
from edged.bundle import Bundle
from edged.tensors import Quantization, TensorSpec

LAYOUTS = {2: "NC", 3: "NCW", 4: "NCHW", 5: "NCDHW"}


class OnnxTFConverter:
    """onnx2tf float SavedModel, then TFLiteConverter int8 (in build/tf-venv)."""

    name = "tflite-onnx2tf"
    runtime = "tflite"
    extra = "make install-tf"

    def __init__(self, per_channel: bool = True, timeout_s: float = 900) -> None:
        self.per_channel = per_channel
        self.timeout_s = timeout_s

    def convert(self, source: Path, profile: Any, calibration: Samples | np.ndarray, *, dest: Path,
                info: BundleInfo) -> Bundle:
        from converters import onnx_tf
        from converters.base import load_onnx

        source = Path(source)
        samples = as_samples(calibration, onnx_model_inputs(load_onnx(source, "convert-onnx")))
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-onnx2tf-", dir=dest.parent))
        try:
            result = onnx_tf.convert(source, dict(samples.arrays), work, per_channel=self.per_channel,
                                     timeout_s=self.timeout_s)
            inputs, outputs = tflite_specs(result.tflite)
            left_float = result.details.get("float_ops") or []
            notes = [f"onnx2tf left {len(left_float)} operator(s) in float: {', '.join(map(str, left_float[:8]))}"] \
                if left_float else []
            return finish_bundle(
                dest=dest, info=info, profile=profile, runtime="tflite", model_file="model.tflite",
                files={"model.tflite": result.tflite}, inputs=inputs, outputs=outputs, calibration=samples,
                reference=onnx_reference(source), source=source,
                provenance={
                    "converter": self.name, "precision": "int8", "route": "onnx2tf",
                    "io": result.io, "onnx2tf_backend": result.backend,
                    "calibration_samples_used": result.calibration_samples,
                    "tools": {"onnx2tf": result.details.get("onnx2tf"), "tensorflow": result.details.get("tensorflow"),
                              "onnx": dist_version("onnx")},
                    **({"notes": notes} if notes else {}),
                },
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)


def tflite_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Every input and output as the converted model reports it."""
    from edged.runtimes import RuntimeOptions, create_runtime

    runtime = create_runtime("tflite")
    runtime.load(str(model_path), RuntimeOptions())
    try:
        def with_layout(spec: TensorSpec) -> TensorSpec:
            quant = spec.quantization
            return TensorSpec(spec.name, spec.dtype, tuple(spec.shape), LAYOUTS.get(len(spec.shape), ""),
                              Quantization(quant.scale, quant.zero_point) if quant else None)

        return [with_layout(s) for s in runtime.inputs], [with_layout(s) for s in runtime.outputs]
    finally:
        runtime.unload()
