"""ONNX -> full-integer int8 TFLite (or its fp16/fp32 twin) through onnx2tf
(``converters.onnx_tf``), as a ``Converter``: the route for graphs the MLP
writer does not take (LSTM, GRU, SpaceToDepth, computed Clip bounds, several
inputs). The worker runs in ``build/tf-venv`` (``make install-tf``); this
module only wraps its result into a bundle with the ONNX model as the
reference.
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
FLOAT_PRECISIONS = ("fp16", "fp32")  # the float twins, best first: fp16 weights halve the size


class OnnxTFConverter:
    """onnx2tf float SavedModel, then TFLiteConverter int8 (in build/tf-venv).

    The int8 run also writes the fp16 and fp32 TFLite twins of the same
    wrapped model and keeps them (in the staging folder, next to ``dest``):
    ``float_variant`` hands them out as converters for the accuracy fallback
    and the same-runtime fp32 baseline without running onnx2tf again."""

    name = "tflite-onnx2tf"
    runtime = "tflite"
    extra = "make install-tf"

    def __init__(self, per_channel: bool = True, timeout_s: float = 900, precision: str = "int8",
                 float_files: dict[str, Path] | None = None) -> None:
        self.per_channel = per_channel
        self.timeout_s = timeout_s
        self.precision = precision
        self.float_files: dict[str, Path] = float_files if float_files is not None else {}  # the twins, shared

    def float_variant(self, precision: str) -> "OnnxTFConverter":
        """The same route at a float precision (fp16 or fp32), from the int8 run's twin when it wrote one."""
        return OnnxTFConverter(self.per_channel, self.timeout_s, precision, self.float_files)

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
            prebuilt = self.float_files.get(self.precision)
            if prebuilt is not None and prebuilt.is_file():
                return self._bundle(prebuilt, None, source, profile, samples, dest, info)
            precisions = ("int8", *FLOAT_PRECISIONS) if self.precision == "int8" else (self.precision,)
            result = onnx_tf.convert(source, dict(samples.arrays), work, per_channel=self.per_channel,
                                     timeout_s=self.timeout_s, precisions=precisions)
            self._keep_floats(result.float_tflite, dest)
            return self._bundle(result.tflite, result, source, profile, samples, dest, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _keep_floats(self, files: dict[str, Path], dest: Path) -> None:
        keep = dest.parent / f".{dest.name}-float-twins"
        keep.mkdir(parents=True, exist_ok=True)
        for precision, path in files.items():
            kept = keep / f"model_{precision}.tflite"
            shutil.copyfile(path, kept)
            self.float_files[precision] = kept

    def _bundle(self, tflite: Path, result: Any, source: Path, profile: Any, samples: Samples, dest: Path,
                info: BundleInfo) -> Bundle:
        inputs, outputs = tflite_specs(tflite)
        details = result.details if result is not None else {}
        left_float = (details.get("float_ops") or []) if self.precision == "int8" else []
        notes = [f"onnx2tf left {len(left_float)} operator(s) in float: {', '.join(map(str, left_float[:8]))}"] \
            if left_float else []
        provenance: dict[str, Any] = {"converter": self.name, "precision": self.precision, "route": "onnx2tf"}
        if result is not None:
            provenance.update({
                "io": result.io, "onnx2tf_backend": result.backend,
                "calibration_samples_used": result.calibration_samples,
                "tools": {"onnx2tf": details.get("onnx2tf"), "tensorflow": details.get("tensorflow"),
                          "onnx": dist_version("onnx")},
            })
        else:
            provenance.update({"io": "float", "written_with": "the int8 run's float twin (same onnx2tf SavedModel)"})
        if notes:
            provenance["notes"] = notes
        return finish_bundle(
            dest=dest, info=info, profile=profile, runtime="tflite", model_file="model.tflite",
            files={"model.tflite": tflite}, inputs=inputs, outputs=outputs, calibration=samples,
            reference=onnx_reference(source), source=source, provenance=provenance,
        )


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
