"""ONNX fp32 -> OpenVINO IR (model.xml + model.bin), fp16 or int8.

``ov.convert_model`` with a static input shape (every dimension but the
batch, which stays dynamic unless ``batch`` is given), then either
``ov.save_model(compress_to_fp16=True)`` (fp16) or ``nncf.quantize`` with the
calibration data (int8, weights and activations; inputs stay float32); fp32
saves the IR as it is. For int8, ``preset`` picks nncf's quantization preset
(performance: symmetric activations, mixed: asymmetric) and ``float_nodes``
keeps operations in float through an nncf ``IgnoredScope``: ONNX node names
or the names of the tensors they produce, mapped onto the OpenVINO graph
(``converters.tune`` finds them).
"""

from __future__ import annotations

import shutil
import tempfile
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
    require,
)
from converters.data import ModelInput, Samples, as_samples
from edged.bundle import Bundle
from edged.tensors import TensorSpec

EXTRA = "convert-openvino"
LAYOUTS = {2: "NC", 3: "NCW", 4: "NCHW"}
PRESETS = ("performance", "mixed")


def _specs(ports: Any) -> list[TensorSpec]:
    """The daemon's own reading of each port, plus a layout from the rank."""
    from dataclasses import replace

    from edged.runtimes.openvino import port_spec

    return [replace(spec, layout=LAYOUTS.get(len(spec.shape), "")) for spec in map(port_spec, ports)]


def _fold_ifs_at(model: Any, shapes: dict[str, list[int]]) -> Any | None:
    """A copy of the ONNX ``model`` at these static input shapes with the If
    nodes they decide replaced by their branch (``converters.fold``), or None
    when none folds."""
    import onnx

    from converters.fold import fold_model

    static = onnx.ModelProto()
    static.CopyFrom(model)
    for inp in static.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = size
    try:
        return fold_model(static, {}, static_shapes=True)
    except Exception:  # the fold is a help: convert the model as it is
        return None


def _keep_onnx_output_names(ov: Any, ov_model: Any, onnx_names: list[str]) -> None:
    """When compiling fuses an output with the op before it (ReduceMean then
    Unsqueeze), the output port also carries that op's tensor name and the
    daemon, which reads a port's first name, would see that one: such internal
    names are taken off the model, so each output keeps its ONNX name."""
    compiled = ov.Core().compile_model(ov_model, "CPU")
    extra: set[str] = set()
    for port in compiled.outputs:
        names = set(port.get_names())
        ours = [n for n in onnx_names if n in names]
        if len(ours) == 1 and port.get_any_name() != ours[0]:
            extra |= names - {ours[0]}
    if not extra:
        return
    for op in ov_model.get_ops():
        for out in op.outputs():
            names = set(out.get_names())
            if names & extra:
                out.get_tensor().set_names(names - extra)


class OpenVinoConverter:
    """ONNX -> OpenVINO IR bundle."""

    name = "openvino_ir"
    runtime = "openvino"
    extra = EXTRA

    def __init__(self, precision: str | None = None, batch: int | None = None, preset: str | None = None,
                 float_nodes: tuple[str, ...] | list[str] = ()) -> None:
        if preset not in (None, *PRESETS):
            raise ConversionError(f"unknown nncf preset {preset!r}; expected {', '.join(PRESETS)}")
        self.precision = precision
        self.batch = batch  # None: dynamic batch dimension
        self.preset = preset  # None: nncf's default (performance)
        self.float_nodes = tuple(float_nodes)

    def convert(self, source: Path, profile: Any, calibration: Samples | np.ndarray, *, dest: Path,
                info: BundleInfo) -> Bundle:
        ov = require("openvino", EXTRA, "the OpenVINO converter")
        source = Path(source)
        model = load_onnx(source, EXTRA)
        specs = onnx_model_inputs(model)
        samples = as_samples(calibration, specs)
        precision = self.precision or getattr(profile, "precision", None) or "fp16"
        shapes = {spec.name: self._static_shape(spec, samples.arrays[spec.name].shape[1:]) for spec in specs}
        notes: list[str] = []
        convert_from: Any = str(source)
        if any(n.op_type == "If" for n in model.graph.node):  # If nodes on dims: folded at the data's shapes
            folded = _fold_ifs_at(model, {n: [int(d) for d in samples.arrays[n].shape[1:]] for n in shapes})
            if folded is not None:
                import onnx

                convert_from = Path(dest).parent / f".{Path(dest).name}-folded.onnx"
                convert_from.parent.mkdir(parents=True, exist_ok=True)
                onnx.save(folded, str(convert_from))
                shapes = {n: [int(d) for d in samples.arrays[n].shape[1:]] for n in shapes}
                notes.append("If nodes decided by the input shapes were replaced by their branch, at the "
                             f"data's shapes ({shapes}); the batch dimension is fixed")
        try:
            ov_model = ov.convert_model(convert_from, input=[(n, ov.PartialShape(s)) for n, s in shapes.items()])
        except Exception as exc:
            raise ConversionError(f"{source.name}: OpenVINO cannot convert the model: {_first_reason(exc)}; "
                                  "use an ONNX profile (e.g. --profile generic-x86)") from None
        finally:
            if isinstance(convert_from, Path):
                convert_from.unlink(missing_ok=True)
        tools = {"openvino": dist_version("openvino"), "onnx": dist_version("onnx")}
        provenance: dict[str, Any] = {
            "converter": self.name, "precision": precision, "input_shapes": shapes, "tools": tools,
            **({"notes": notes} if notes else {}),
        }
        if precision == "int8":
            try:
                nncf = require("nncf", EXTRA, "OpenVINO int8 quantization")
            except ConverterUnavailable:
                raise
            tools["nncf"] = dist_version("nncf")
            dataset = nncf.Dataset(list(samples))
            options: dict[str, Any] = {}
            if self.preset:
                options["preset"] = nncf.QuantizationPreset(self.preset)
                provenance["nncf_preset"] = self.preset
            if self.float_nodes:
                ignored = ov_op_names(ov_model, self.float_nodes)
                options["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
                provenance["float_nodes"] = ignored
            import logging

            quiet = logging.getLogger("nncf")  # one INFO line per ignored node otherwise
            level, quiet.level = quiet.level, logging.WARNING
            try:
                ov_model = nncf.quantize(ov_model, dataset, subset_size=len(samples), **options)
            except Exception as exc:
                raise ConversionError(f"{source.name}: nncf.quantize failed: {exc}") from None
            finally:
                quiet.level = level
            compress = False
        elif precision in ("fp16", "fp32"):
            compress = precision == "fp16"
        else:
            raise ConversionError(f"unknown precision {precision!r}; expected int8, fp16 or fp32")
        _keep_onnx_output_names(ov, ov_model, [o.name for o in model.graph.output])
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-ov-", dir=dest.parent))
        try:
            xml = work / "model.xml"
            ov.save_model(ov_model, str(xml), compress_to_fp16=compress)
            compiled = ov.Core().read_model(str(xml))
            inputs, outputs = _specs(compiled.inputs), _specs(compiled.outputs)

            try:
                reference = onnx_reference(source)
            except ConverterUnavailable:  # no onnxruntime: OpenVINO runs the fp32 source
                fp32 = ov.Core().compile_model(str(source), "CPU")

                def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                    result = fp32(feed)
                    return {p.get_any_name(): np.asarray(result[p]) for p in fp32.outputs}

            return finish_bundle(
                dest=dest, info=info, profile=profile, runtime="openvino", model_file="model.xml",
                files={"model.xml": xml, "model.bin": work / "model.bin"},
                inputs=inputs, outputs=outputs, calibration=samples, reference=reference,
                source=source, provenance=provenance,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _static_shape(self, spec: ModelInput, sample_shape: tuple[int, ...]) -> list[int]:
        """The shape of one call from the data; a dynamic batch dim 0 stays dynamic."""
        shape = [int(d) for d in sample_shape]
        if shape and spec.shape and spec.shape[0] < 0:
            shape[0] = self.batch or -1
        return shape


def ov_op_names(ov_model: Any, wanted: tuple[str, ...]) -> list[str]:
    """OpenVINO operations named in ``wanted`` (by friendly name), or producing
    a tensor named there (ONNX tensor names survive ``convert_model``)."""
    wanted_set, found = set(wanted), []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("Parameter", "Result", "Constant"):
            continue
        names = {op.get_friendly_name()} | {n for out in op.outputs() for n in out.get_names()}
        if names & wanted_set:
            found.append(op.get_friendly_name())
    return found


def _first_reason(exc: Exception) -> str:
    """The line of an OpenVINO error that names what failed, not its C++ trace."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("Conversion is failed for", "Failed operations", "Model wasn't fully converted"):
        found = next((line for line in lines if marker in line), None)
        if found:
            return found.lstrip("- ")
    return lines[0][:300] if lines else type(exc).__name__
