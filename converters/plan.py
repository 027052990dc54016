"""The plan for one profile: runtime, precision and the converter that does it.

``plan_for`` refuses early (``Skipped`` or ``BadInput``) what cannot work on
this machine or for this model, so nothing fails after minutes of work.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.errors import BadInput, ConversionError, ConverterUnavailable, Skipped, UnsupportedOp
from converters.source import Source, serve_as_is_hint

STATIC_SHAPE_RUNTIMES = ("tflite", "openvino")


@dataclass
class Plan:
    runtime: str
    precision: str
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def _needs(runtime: str, source: Source, precision: str) -> list[tuple[str, str, str]]:
    """(module, extra, what) the converter for this target imports."""
    if runtime == "onnx":
        return [("onnxruntime", "convert-onnx", "the ONNX converter")]
    if runtime == "openvino":
        needs = [("openvino", "convert-openvino", "the OpenVINO converter")]
        return needs + ([("nncf", "convert-openvino", "OpenVINO int8 quantization")] if precision == "int8" else [])
    if source.kind == "tf":
        return [("tensorflow", "convert-tf", "Keras/SavedModel to TFLite conversion")]
    if source.kind == "torch":
        return [("litert_torch", "convert-torch", "PyTorch to TFLite conversion")]
    return [("ai_edge_litert", "convert-tflite", "the TFLite writer"), ("flatbuffers", "convert-tflite", "the TFLite writer")]


def plan_for(profile: Any, source: Source) -> Plan:
    """Runtime and precision from the profile; Skipped when this machine can't."""
    from converters.base import require
    from edged.runtimes import BACKENDS

    runtime, precision = profile.output, profile.precision
    plan = Plan(runtime, precision, provenance={"profile": profile.name, "profile_precision": precision})
    if source.kind != "onnx" and runtime != "tflite":
        what = "Keras/SavedModel" if source.kind == "tf" else "PyTorch (.pt2)"
        raise Skipped(f"{what} sources become TFLite only; profile {profile.name} wants {runtime} "
                      "(export the model to ONNX for that target)")
    backend = BACKENDS[runtime]
    if backend.library() is None:
        raise Skipped(f"runtime {runtime} is not installed here: pip install 'edged[{backend.extra}]'")
    try:
        for module, extra, what in _needs(runtime, source, precision):
            require(module, extra, what)
    except ConverterUnavailable as exc:
        raise Skipped(str(exc)) from None
    if runtime == "onnx" and precision == "fp16" and importlib.util.find_spec("onnxconverter_common") is None:
        fallback = profile.fallback_precision
        if not fallback:
            raise Skipped("ONNX fp16 needs onnxconverter-common (pip install onnxconverter-common)")
        reason = (f"profile precision fp16 needs onnxconverter-common, which is not installed; "
                  f"used the profile's fallback_precision {fallback}")
        plan.precision = fallback
        plan.notes.append(reason)
        plan.provenance["precision_fallback"] = reason
    if runtime == "tflite" and plan.precision != "int8":
        raise Skipped(f"the TFLite writer only produces full-integer int8, profile asks for {plan.precision}")
    multi_ok = source.kind == "onnx" and "onnx2tf" in onnx_tflite_routes()  # onnx2tf takes several inputs
    if runtime == "tflite" and not multi_ok and (len(source.inputs) != 1 or not source.input.is_float):
        raise UnsupportedOp(
            f"{source.original.name}: TFLite conversion takes models with one float input; this one has "
            f"{', '.join(i.describe() for i in source.inputs)}. Use an ONNX profile (e.g. --profile generic-x86), "
            f"or convert it to .tflite elsewhere and {serve_as_is_hint(source.original)}"
        )
    for spec in source.inputs:
        if runtime in STATIC_SHAPE_RUNTIMES and spec.dynamic_non_batch:
            dims = ", ".join(str(i) for i in spec.dynamic_non_batch)
            example = ",".join("224" if d < 0 else str(d) for d in spec.shape)
            raise BadInput(
                f"{source.original.name}: input {spec.name!r} has dynamic non-batch dims ({dims}) "
                f"{list(spec.shape)}; {runtime} needs static shapes: pass --calib data (its shape is used) "
                f"or --input-shape {spec.name}={example}"
            )
    return plan


def make_converter(plan: Plan, profile: Any, source: Source) -> Any:
    """The first converter for this plan (``converters.base.Converter``)."""
    return make_converters(plan, profile, source)[0]


def make_converters(plan: Plan, profile: Any, source: Source) -> list[Any]:
    """The converters that can do this plan, the one to try first first:
    one for most targets, the available routes for ONNX -> TFLite."""
    from converters import get_converter

    per_channel = bool(profile.runtime_options("onnx").get("per_channel", True))
    if source.kind == "tf":
        from converters.tflite_keras import KerasTFLiteConverter

        return [KerasTFLiteConverter()]
    if source.kind == "torch":
        from converters.tflite_torch import TorchTFLiteConverter

        return [TorchTFLiteConverter(per_channel=per_channel)]
    if plan.runtime == "tflite":
        return tflite_routes_for_onnx(source.static_path or source.path, per_channel)
    return [get_converter(plan.runtime, precision=plan.precision)]


def onnx_tflite_routes() -> list[str]:
    """The ONNX -> TFLite routes beyond the MLP writer that can run here, faster first."""
    from converters import onnx_tf
    from converters.onnx_torch import available as torch_route_available

    return [name for name, ok in (("onnx2tf", onnx_tf.available()), ("onnx2torch", torch_route_available())) if ok]


def tflite_routes_for_onnx(path: Path, per_channel: bool) -> list[Any]:
    """The TensorFlow-free writer when the ONNX graph is an MLP it supports;
    otherwise onnx2tf (build/tf-venv) and onnx2torch + litert-torch, those
    that are installed, in that order; otherwise the writer's UnsupportedOp
    with what to install."""
    from converters import get_converter
    from converters.base import load_onnx
    from converters.tflite_int8_graph import parse_onnx

    try:
        parse_onnx(load_onnx(path, "convert-tflite"))
    except ConversionError as exc:  # UnsupportedOp, or a graph shape the writer does not take
        routes = onnx_tflite_routes()
        if not routes:
            raise UnsupportedOp(
                f"{exc}; ONNX models beyond MLPs (convolutions, recurrences, ...) become TFLite through onnx2tf "
                "(make install-tf: build/tf-venv) or onnx2torch and litert-torch (pip install "
                "'edged[convert-torch]')"
            ) from None
        converters = []
        for route in routes:
            if route == "onnx2tf":
                from converters.tflite_onnx2tf import OnnxTFConverter

                converters.append(OnnxTFConverter(per_channel=per_channel))
            else:
                from converters.tflite_torch import TorchTFLiteConverter

                converters.append(TorchTFLiteConverter(per_channel=per_channel))
        return converters
    return [get_converter("tflite", per_channel=per_channel)]
