"""ONNX fp32 -> ONNX int8 QDQ (onnxruntime.quantization), plus passthroughs.

int8: ``quant_pre_process`` (shape inference + optimisation), then
``quantize_static`` with QuantFormat.QDQ, activations QUInt8, weights QInt8,
per-channel (unless the profile's ``[runtime.onnx] per_channel`` is false),
MinMax calibration. Inputs and outputs stay float32. ``QuantOptions`` changes
the calibration method (MinMax, Entropy, Percentile), per-channel weights,
symmetric int8 activations and the nodes kept in float (``nodes_to_exclude``,
named as in the prepared graph: ``prepare_float_model``); ``converters.tune``
uses them when plain int8 misses the gate.

fp32: the source model copied as is. fp16: onnxconverter-common's
``convert_float_to_float16`` with float32 inputs/outputs kept, when installed.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import (
    BundleInfo,
    ConversionError,
    ConverterUnavailable,
    dist_version,
    finish_bundle,
    load_onnx,
    onnx_model_inputs,
    onnx_reference,
    profile_option,
    require,
)
from converters.data import Samples, as_samples
from edged.bundle import Bundle
from edged.tensors import TensorSpec

EXTRA = "convert-onnx"
LAYOUTS = {2: "NC", 3: "NCW", 4: "NCHW"}
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
PERCENTILE = 99.999
_ELEM = {1: "float32", 10: "float16", 11: "float64", 3: "int8", 2: "uint8", 6: "int32", 7: "int64"}


def onnx_specs(model: Any, layouts: dict[str, str] | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """TensorSpecs of an ONNX model's graph inputs and outputs (symbolic dims -> -1)."""
    inits = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        layout = (layouts or {}).get(vi.name, LAYOUTS.get(len(shape), ""))
        return TensorSpec(vi.name, _ELEM.get(tt.elem_type, "float32"), shape, layout)

    return (
        [spec(i) for i in model.graph.input if i.name not in inits],
        [spec(o) for o in model.graph.output],
    )


@dataclass(frozen=True)
class QuantOptions:
    """How ``quantize_static`` runs; the defaults are plain int8."""

    per_channel: bool = True
    calibration: str = "MinMax"  # one of CALIBRATION_METHODS
    symmetric_activations: bool = False  # QInt8 activations with a symmetric range (else QUInt8, asymmetric)
    nodes_to_exclude: tuple[str, ...] = field(default_factory=tuple)  # node names of the prepared graph

    def provenance(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "format": "QDQ", "activations": "QInt8 symmetric" if self.symmetric_activations else "QUInt8",
            "weights": "QInt8", "per_channel": self.per_channel, "calibration_method": self.calibration,
        }
        if self.calibration == "Percentile":
            found["calibration_percentile"] = PERCENTILE
        if self.nodes_to_exclude:
            found["float_nodes"] = list(self.nodes_to_exclude)
        return found


class OnnxQDQConverter:
    """ONNX -> ONNX bundle (int8 QDQ, fp16 or fp32)."""

    name = "onnx_qdq"
    runtime = "onnx"
    extra = EXTRA

    def __init__(self, precision: str | None = None, per_channel: bool | None = None,
                 calibration: str = "MinMax", symmetric_activations: bool = False,
                 nodes_to_exclude: tuple[str, ...] | list[str] = ()) -> None:
        if calibration not in CALIBRATION_METHODS:
            raise ConversionError(f"unknown calibration method {calibration!r}; expected {', '.join(CALIBRATION_METHODS)}")
        self.precision = precision
        self.per_channel = per_channel
        self.calibration = calibration
        self.symmetric_activations = symmetric_activations
        self.nodes_to_exclude = tuple(nodes_to_exclude)

    def options(self, profile: Any) -> QuantOptions:
        """The quantization options, per-channel from the profile unless set."""
        per_channel = self.per_channel if self.per_channel is not None else bool(
            profile_option(profile, "onnx", "per_channel", True))
        return QuantOptions(per_channel, self.calibration, self.symmetric_activations, self.nodes_to_exclude)

    def convert(self, source: Path, profile: Any, calibration: Samples | np.ndarray, *, dest: Path,
                info: BundleInfo) -> Bundle:
        ort = require("onnxruntime", EXTRA, "the ONNX converter")
        ort.set_default_logger_severity(3)  # graph clean-up warnings on stderr otherwise
        source = Path(source)
        model = load_onnx(source, EXTRA)
        samples = as_samples(calibration, onnx_model_inputs(model))
        precision = self.precision or getattr(profile, "precision", None) or "int8"
        options = self.options(profile)
        tools = {"onnx": dist_version("onnx"), "onnxruntime": dist_version("onnxruntime")}
        provenance: dict[str, Any] = {"converter": self.name, "precision": precision, "tools": tools}
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-onnx-", dir=dest.parent))
        try:
            out = work / "model.onnx"
            if precision == "fp32":
                shutil.copyfile(source, out)
            elif precision == "fp16":
                try:
                    from onnxconverter_common import float16
                except ImportError:
                    raise ConverterUnavailable(
                        "ONNX fp16 needs onnxconverter-common: pip install onnxconverter-common"
                    ) from None
                import onnx

                onnx.save(float16.convert_float_to_float16(model, keep_io_types=True), str(out))
                tools["onnxconverter-common"] = dist_version("onnxconverter-common")
            elif precision == "int8":
                quantize_prepared(prepare_float_model(source, work), out, samples, options)
                provenance.update(options.provenance())
                if not _quantized_nodes(out):
                    shutil.copyfile(source, out)
                    provenance.update(precision="fp32", notes=[
                        "int8: onnxruntime quantized no operator of this graph (its compute may sit inside "
                        "If/Loop branches); the bundle keeps the fp32 model"])
            else:
                raise ConversionError(f"unknown precision {precision!r}; expected int8, fp16 or fp32")
            import onnx

            inputs, outputs = onnx_specs(onnx.load(str(out)))
            return finish_bundle(
                dest=dest, info=info, profile=profile, runtime="onnx", model_file="model.onnx",
                files={"model.onnx": out}, inputs=inputs, outputs=outputs, calibration=samples,
                reference=onnx_reference(source), source=source, provenance=provenance,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)


def prepare_float_model(source: Path, work: Path) -> Path:
    """The float graph int8 QDQ starts from, in ``work``: opset >= 13, shapes
    inferred, optimised where onnxruntime can, every node named (nodes to keep
    in float are named as here)."""
    import importlib.util

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = Path(source)
    # Per-channel QDQ writes DequantizeLinear with an ``axis`` attribute,
    # which needs opset 13; older exports (e.g. PaddleOCR's opset 11) are
    # upgraded first, or onnxruntime rejects the quantized graph.
    model = onnx.load(str(source))
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, 13)
        except Exception as exc:
            raise ConversionError(f"{source.name}: cannot upgrade opset {opset} -> 13 for int8 QDQ: {exc}") from None
        source = work / "opset13.onnx"
        onnx.save(upgraded, str(source))
    prepared = work / "prepared.onnx"
    # Symbolic shape inference needs sympy; ONNX shape inference is enough
    # for models with static non-batch dims, so skip it when sympy is absent.
    symbolic = importlib.util.find_spec("sympy") is not None
    _prepare(quant_pre_process, source, prepared, symbolic)
    model = onnx.load(str(prepared))
    unnamed = [node for node in model.graph.node if not node.name]
    if unnamed:
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(model, str(prepared))
    return prepared


def quantize_prepared(prepared: Path, out: Path, samples: Samples, options: QuantOptions) -> None:
    """``quantize_static`` of a graph from ``prepare_float_model`` into ``out``."""
    import contextlib
    import io

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    extra: dict[str, Any] = {"CalibTensorRangeSymmetric": False}
    if options.symmetric_activations:
        extra["ActivationSymmetric"] = True
    if options.calibration == "Percentile":
        extra["CalibPercentile"] = PERCENTILE
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            quantize_static(
                str(prepared), str(out), Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if options.symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=options.per_channel,
                calibrate_method=getattr(CalibrationMethod, options.calibration),
                nodes_to_exclude=list(options.nodes_to_exclude),
                extra_options=extra,
            )
    except Exception as exc:
        raise ConversionError(f"{Path(prepared).name}: quantize_static failed: {exc}") from None


def _prepare(quant_pre_process: Any, source: Path, prepared: Path, symbolic: bool) -> None:
    """Shape inference and graph optimisation before quantization. When
    onnxruntime cannot optimise the graph (e.g. If branches with shapes it
    cannot infer), quantize the unoptimised graph instead."""
    import logging

    log = logging.getLogger("onnxruntime.quantization.shape_inference")
    level, log.level = log.level, logging.CRITICAL  # it logs a traceback before giving up
    try:
        for skip_optimization in (False, True):
            try:
                quant_pre_process(str(source), str(prepared), skip_symbolic_shape=not symbolic,
                                  skip_optimization=skip_optimization)
                if prepared.is_file():
                    return
            except Exception as exc:
                if skip_optimization:
                    raise ConversionError(f"{source.name}: quant_pre_process failed: {exc}") from None
    finally:
        log.level = level


def _quantized_nodes(path: Path) -> int:
    """QuantizeLinear nodes in the main graph of a quantized model."""
    import onnx

    return sum(1 for node in onnx.load(str(path)).graph.node if node.op_type == "QuantizeLinear")
