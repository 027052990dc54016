"""Model converters: a float model -> a validated edged bundle per hardware profile.

The pipeline (``edged convert``), one module per stage:

* ``source``   read and check the source model, run it in float
* ``data``     calibration / held-out samples keyed by input name
* ``plan``     runtime, precision and converter per profile; early refusals
* ``report``   the converted bundle against the source, per output (``metrics``)
* ``pipeline`` one profile start to end: convert, validate, gate, write atomically
* ``errors``   every conversion error, with codes and exit codes

Each target is one module behind the ``converters.base.Converter`` protocol:

* ``onnx_qdq.OnnxQDQConverter``      ONNX int8 QDQ (or fp32/fp16)   edged[convert-onnx]
* ``openvino_ir.OpenVinoConverter``  OpenVINO IR fp16 or int8        edged[convert-openvino]
* ``tflite_int8.TFLiteInt8Converter`` full-integer int8 .tflite     edged[convert-tflite]
  (TensorFlow-free writer, MLP subset of ONNX)
* ``tflite_keras.KerasTFLiteConverter`` Keras / SavedModel -> full-integer int8 .tflite
  with TensorFlow's TFLiteConverter                                 edged[convert-tf]
* ``tflite_torch.TorchTFLiteConverter`` PyTorch .pt2, or an ONNX model beyond the
  MLP subset (translated by ``onnx_torch`` with onnx2torch) -> full-integer int8
  .tflite with litert-torch PT2E                                    edged[convert-torch]

``wrap`` (``edged bundle create``) wraps a model as it is, without conversion.
Modules import their libraries lazily; a missing one raises
``ConverterUnavailable`` naming the extra.
"""

from __future__ import annotations

from typing import Any

from converters.base import BundleInfo, ConversionError, Converter, ConverterUnavailable, UnsupportedOp

__all__ = [
    "BundleInfo", "ConversionError", "Converter", "ConverterUnavailable", "UnsupportedOp", "get_converter",
]


def get_converter(runtime: str, **options: Any) -> Converter:
    """The converter that writes bundles for ``runtime`` (tflite, onnx, openvino)."""
    if runtime == "onnx":
        from converters.onnx_qdq import OnnxQDQConverter

        return OnnxQDQConverter(**options)
    if runtime == "openvino":
        from converters.openvino_ir import OpenVinoConverter

        return OpenVinoConverter(**options)
    if runtime == "tflite":
        from converters.tflite_int8 import TFLiteInt8Converter

        return TFLiteInt8Converter(**options)
    raise ConversionError(f"no converter for runtime {runtime!r}; known: onnx, openvino, tflite")
