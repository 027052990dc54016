"""Keras model or TF SavedModel -> full-integer int8 TFLite, with TensorFlow's
own ``TFLiteConverter`` and a representative dataset (pip extra ``convert-tf``).

Unlike ``tflite_int8`` (our TensorFlow-free writer for an MLP subset of ONNX),
this handles whatever TFLite's converter does: convolutions, pooling,
depthwise convolutions and the rest of the TFLite builtin int8 kernels.

Sources: a ``.keras`` / ``.h5`` file, or a SavedModel directory (with a
``saved_model.pb``). The input keeps the model's own layout, NHWC for Keras
image models; the manifest records it as the model reports it. Quantization
parameters are read back from the converted model with the TFLite interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from converters.base import BundleInfo, ConversionError, dist_version, finish_bundle, require
from converters.data import ModelInput, Samples, as_samples
from edged.bundle import Bundle
from edged.tensors import Quantization, TensorSpec

EXTRA = "convert-tf"
LAYOUTS = {2: "NC", 3: "NWC", 4: "NHWC", 5: "NDHWC"}


def is_tf_source(path: Path) -> bool:
    path = Path(path)
    return path.suffix in (".keras", ".h5") or (path.is_dir() and (path / "saved_model.pb").is_file())


@dataclass
class TFSource:
    """A loaded Keras model or SavedModel with one float input."""

    path: Path
    input_name: str
    input_shape: tuple[int, ...]  # -1 for the batch
    output_names: list[str]
    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    converter: Callable[[], Any]  # -> a tf.lite.TFLiteConverter


def load_tf_source(path: Path) -> TFSource:
    tf = require("tensorflow", EXTRA, "Keras/SavedModel conversion")
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such model")
    if path.is_dir():
        try:
            loaded = tf.saved_model.load(str(path))
            fn = loaded.signatures["serving_default"]
        except Exception as exc:
            raise ConversionError(f"{path}: not a loadable SavedModel with a serving_default signature: {exc}") from None
        specs = list(fn.structured_input_signature[1].values())
        if len(specs) != 1:
            raise ConversionError(f"{path}: TFLite conversion supports one input, found {len(specs)}")
        spec = specs[0]
        out_names = sorted(fn.structured_outputs)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            result = fn(**{spec.name: tf.constant(x, dtype=tf.float32)})
            return {k: result[k].numpy() for k in out_names}

        return TFSource(path, spec.name, tuple(-1 if d is None else int(d) for d in spec.shape), out_names, run,
                        lambda: tf.lite.TFLiteConverter.from_saved_model(str(path)))
    try:
        model = tf.keras.models.load_model(str(path), compile=False)
    except Exception as exc:
        raise ConversionError(f"{path.name}: not a loadable Keras model: {exc}") from None
    if len(model.inputs) != 1:
        raise ConversionError(f"{path.name}: TFLite conversion supports one input, found {len(model.inputs)}")
    shape = tuple(-1 if d is None else int(d) for d in model.inputs[0].shape)
    out_names = [f"output_{i}" if len(model.outputs) > 1 else "output" for i in range(len(model.outputs))]

    def run_keras(x: np.ndarray) -> dict[str, np.ndarray]:
        out = model(x.astype(np.float32), training=False)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return {name: np.asarray(o) for name, o in zip(out_names, outs)}

    return TFSource(path, "input", shape, out_names, run_keras,
                    lambda: tf.lite.TFLiteConverter.from_keras_model(model))


class KerasTFLiteConverter:
    """TFLiteConverter, full-integer int8 (int8 input and output tensors)."""

    name = "tflite-keras"
    runtime = "tflite"
    extra = EXTRA

    def convert(self, source: Path, profile: Any, calibration: Samples | np.ndarray, *, dest: Path,
                info: BundleInfo) -> Bundle:
        tf = require("tensorflow", EXTRA, "Keras/SavedModel conversion")
        src = load_tf_source(source)
        samples = as_samples(calibration, [ModelInput(src.input_name, tuple(src.input_shape))])
        calib = samples.single()

        def representative() -> Any:
            for i in range(len(calib)):
                yield [calib[i:i + 1]]

        converter = src.converter()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        try:
            flat = converter.convert()
        except Exception as exc:
            raise ConversionError(f"{Path(source).name}: TFLiteConverter failed: {type(exc).__name__}: {exc}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        model_path = dest.parent / f".{dest.name}.model.tflite"
        model_path.write_bytes(flat)
        try:
            inputs, outputs = _specs(model_path, src)
            return finish_bundle(
                dest=dest, info=info, profile=profile, runtime="tflite", model_file="model.tflite",
                files={"model.tflite": model_path}, inputs=inputs, outputs=outputs, calibration=samples,
                reference=lambda feed: dict(zip([o.name for o in outputs], src.run(next(iter(feed.values()))).values())),
                source=source if Path(source).is_file() else Path(source) / "saved_model.pb",
                provenance={"converter": self.name, "precision": "int8", "tensorflow": dist_version("tensorflow-cpu") or dist_version("tensorflow"),
                            "quantization": "full-integer int8 (TFLiteConverter, representative dataset)"},
            )
        finally:
            model_path.unlink(missing_ok=True)


def _specs(model_path: Path, src: TFSource) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Tensor specs with the quantization the converted model itself reports."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path))

    def spec(detail: dict[str, Any], name: str) -> TensorSpec:
        scale, zero = detail["quantization"]
        shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
        shape = (-1, *shape[1:])
        return TensorSpec(
            name=name, dtype=np.dtype(detail["dtype"]).name, shape=shape, layout=LAYOUTS.get(len(shape), ""),
            quantization=Quantization(scale=float(scale), zero_point=int(zero)) if scale else None,
        )

    inputs = interp.get_input_details()
    outputs = interp.get_output_details()
    if len(inputs) != 1:
        raise ConversionError(f"the converted model has {len(inputs)} inputs, expected 1")
    return ([spec(inputs[0], inputs[0]["name"])],
            [spec(d, d["name"]) for d in outputs])
