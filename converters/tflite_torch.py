"""PyTorch -> int8 TFLite with litert-torch and its PT2E quantizer (pip extra
``convert-torch``: torch and litert-torch, several GB; keep it on the build machine).

Source: a ``.pt2`` file, the standard PyTorch 2 archive of an exported program
(``torch.export.save(torch.export.export(model.eval(), (example,)), "m.pt2")``),
so the model's Python code is not needed; or an ONNX model that the MLP-only
writer (``tflite_int8``) cannot take, translated by ``converters.onnx_torch``
(onnx2torch) and exported with batch 1. The validation reference of an ONNX
source is onnxruntime on the original file. Flow: ``prepare_pt2e`` with
litert-torch's ``PT2EQuantizer`` (symmetric, per-channel weights), calibration
on ``--calib`` one sample at a time, ``convert_pt2e``, ``litert_torch.convert``.

What comes out: a full-integer model, int8 weights, int8 kernels (CONV_2D,
FULLY_CONNECTED, ...) and int8 input, because the quantizer is also handed to
``litert_torch.convert`` (``QuantConfig(pt2e_quantizer=...)``), which folds the
quantize/dequantize pairs. (Without it the model keeps float weights behind
DEQUANTIZE ops: larger and 16x slower here.) Tensor dtypes, scales and zero
points are read back from the converted model. The input keeps the source's
layout (NCHW for torch vision models; the converter adds the transposes). The
batch is the exported example's, normally 1 (litert-torch cannot lower a dynamic
batch through flatten/view); the daemon runs larger batches of a batch-1 model
sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from converters.base import BundleInfo, ConversionError, dist_version, finish_bundle, require
from converters.data import ModelInput, Samples, as_samples
from edged.bundle import Bundle
from edged.tensors import TensorSpec

EXTRA = "convert-torch"


def is_torch_source(path: Path) -> bool:
    return Path(path).suffix == ".pt2"


@dataclass
class TorchSource:
    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    output_names: list[str]
    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    program: Any  # torch.export.ExportedProgram
    from_onnx: bool = False
    source_run: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None  # the ONNX original

    def reference(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of the source model itself (onnxruntime for an ONNX source)."""
        return (self.source_run or self.run)(x)


def load_torch_source(path: Path) -> TorchSource:
    torch = require("torch", EXTRA, "PyTorch conversion")
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such model file")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ConversionError(f"{path.name}: not a torch.export program (.pt2): {type(exc).__name__}: {exc}") from None
    example = program.example_inputs[0] if program.example_inputs else ()
    if len(example) != 1 or not hasattr(example[0], "shape"):
        raise ConversionError(f"{path.name}: TFLite conversion supports one tensor input, found {len(example)}")
    if example[0].dtype != torch.float32:
        raise ConversionError(f"{path.name}: input is {example[0].dtype}; only float32 inputs can be quantized")
    return _torch_source(path, program, tuple(int(d) for d in example[0].shape))


def load_onnx_as_torch(path: Path) -> TorchSource:
    """An ONNX model (one float32 input, static non-batch dims) translated by
    onnx2torch (``converters.onnx_torch``) and exported with batch 1."""
    from converters.base import onnx_reference
    from converters.onnx_torch import onnx_program

    onnx = require("onnx", EXTRA, "reading ONNX models")
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in inp.type.tensor_type.shape.dim]
    if any(d < 0 for d in dims[1:]):
        raise ConversionError(f"{path.name}: input {inp.name!r} has dynamic non-batch dims {dims}; pass --input-shape")
    shape = (1, *dims[1:])
    src = _torch_source(path, onnx_program(path, shape), shape)
    src.from_onnx = True
    run_onnx = onnx_reference(path)
    src.source_run = lambda x: run_onnx({inp.name: np.asarray(x, dtype=np.float32)})
    return src


def _torch_source(path: Path, program: Any, shape: tuple[int, ...]) -> TorchSource:
    torch = require("torch", EXTRA, "PyTorch conversion")
    module = program.module()

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = [module(torch.from_numpy(np.ascontiguousarray(x[i:i + 1], dtype=np.float32))) for i in range(len(x))]
        first = outs[0] if isinstance(outs[0], (list, tuple)) else [outs[0]]
        names = [f"output_{i}" for i in range(len(first))]
        return {name: np.concatenate([np.asarray((o if isinstance(o, (list, tuple)) else [o])[j]) for o in outs])
                for j, name in enumerate(names)}

    return TorchSource(path, "input", shape, ["output_0"], run, program)


class TorchTFLiteConverter:
    """litert-torch with PT2E static int8 quantization."""

    name = "tflite-torch"
    runtime = "tflite"
    extra = EXTRA

    def __init__(self, per_channel: bool = True) -> None:
        self.per_channel = per_channel

    def convert(self, source: Path, profile: Any, calibration: Samples | np.ndarray, *, dest: Path,
                info: BundleInfo) -> Bundle:
        torch = require("torch", EXTRA, "PyTorch conversion")
        litert_torch = require("litert_torch", EXTRA, "PyTorch to TFLite conversion")
        pt2e = require("litert_torch.quantize.pt2e_quantizer", EXTRA, "PT2E quantization")
        quantize_pt2e = require("torchao.quantization.pt2e.quantize_pt2e", EXTRA, "PT2E quantization")
        src = load_onnx_as_torch(source) if Path(source).suffix == ".onnx" else load_torch_source(source)
        samples = as_samples(calibration, [ModelInput(src.input_name, tuple(src.input_shape))])
        calib = samples.single()
        example = tuple(src.program.example_inputs[0])
        try:
            quantizer = pt2e.PT2EQuantizer().set_global(
                pt2e.get_symmetric_quantization_config(is_per_channel=self.per_channel))
            prepared = quantize_pt2e.prepare_pt2e(src.program.module(), quantizer)
            with torch.no_grad():
                for i in range(len(calib)):
                    prepared(torch.from_numpy(calib[i:i + 1]))
            quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)  # True fails in the converter passes
            quant_config = require("litert_torch.quantize.quant_config", EXTRA, "PT2E quantization")
            # Passing the quantizer lets the converter fold Q/DQ pairs into int8 kernels;
            # without it the model keeps float weights with dequantize ops in front.
            edge = litert_torch.convert(quantized, example,
                                        quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
        except Exception as exc:
            raise ConversionError(f"{Path(source).name}: litert-torch conversion failed: {type(exc).__name__}: {exc}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        model_path = dest.parent / f".{dest.name}.model.tflite"
        edge.export(str(model_path))
        try:
            inputs, outputs = _specs(model_path)
            return finish_bundle(
                dest=dest, info=info, profile=profile, runtime="tflite", model_file="model.tflite",
                files={"model.tflite": model_path}, inputs=inputs, outputs=outputs, calibration=samples,
                reference=lambda feed: dict(zip([o.name for o in outputs], src.reference(next(iter(feed.values()))).values())),
                source=Path(source),
                provenance={"converter": self.name, "precision": "int8", "torch": dist_version("torch"),
                            "litert_torch": dist_version("litert-torch"),
                            **({"onnx2torch": dist_version("onnx2torch")} if src.from_onnx else {}),
                            "quantization": "PT2E static int8, symmetric, "
                                            + ("per-channel" if self.per_channel else "per-tensor") + " weights"},
            )
        finally:
            model_path.unlink(missing_ok=True)


def _specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Tensor specs as the converted model reports them (one input)."""
    from converters.tflite_onnx2tf import tflite_specs

    inputs, outputs = tflite_specs(model_path)
    if len(inputs) != 1:
        raise ConversionError(f"the converted model has {len(inputs)} inputs, expected 1")
    return inputs, outputs
