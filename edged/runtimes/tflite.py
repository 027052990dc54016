"""TFLite backend: ai-edge-litert, else tflite-runtime, else tensorflow.lite."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from edged.errors import InferenceFailed
from edged.runtimes import RuntimeOptions
from edged.tensors import Quantization, TensorSpec


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            from tensorflow.lite import Interpreter  # type: ignore[no-redef]
    return Interpreter


def _spec(detail: dict[str, Any]) -> TensorSpec:
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quant = None
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        quant = Quantization(scale=float(scale), zero_point=int(zero_point))
    return TensorSpec(
        name=detail["name"],
        dtype=np.dtype(detail["dtype"]).name,
        shape=tuple(int(d) for d in shape),
        quantization=quant,
        extra={"index": detail["index"]},
    )


class TFLiteRuntime:
    """One interpreter, guarded by a lock (interpreters are not thread-safe)."""

    name = "tflite"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._interpreter: Any = None
        self._lock = threading.Lock()
        # (name, index) of inputs and outputs and each input's current shape, read once:
        # get_input_details() builds fresh dicts and costs microseconds per call.
        self._in: list[tuple[str, int]] = []
        self._out: list[tuple[str, int]] = []
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._new_interpreter: Any = None

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        interpreter_cls = _interpreter_class()
        kwargs: dict[str, Any] = {"model_path": model_path}
        if options.threads > 0:
            kwargs["num_threads"] = options.threads
        interpreter = interpreter_cls(**kwargs)
        try:
            interpreter.allocate_tensors()
            allocated = True
        except (RuntimeError, ValueError):
            # A dynamic input whose placeholder shape the model cannot be prepared for
            # (e.g. [-1, -1] audio as [1, 1]): allocate at the first real shape instead.
            if not any(-1 in list(d.get("shape_signature", [])) for d in interpreter.get_input_details()):
                raise
            interpreter = interpreter_cls(**kwargs)
            allocated = False
        self._new_interpreter = lambda: interpreter_cls(**kwargs)
        self._interpreter = interpreter
        self.inputs = [_spec(d) for d in interpreter.get_input_details()]
        self.outputs = [_spec(d) for d in interpreter.get_output_details()]
        self._in = [(d["name"], int(d["index"])) for d in interpreter.get_input_details()]
        self._out = [(d["name"], int(d["index"])) for d in interpreter.get_output_details()]
        self._shapes = {int(d["index"]): tuple(int(x) for x in d["shape"]) if allocated else ()
                        for d in interpreter.get_input_details()}

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            interp = self._interpreter
            resized = False
            for name, index in self._in:
                shape = inputs[name].shape
                if self._shapes[index] != shape:
                    interp.resize_tensor_input(index, list(shape))
                    self._shapes[index] = tuple(shape)
                    resized = True
            if resized:
                interp = self._reallocate(interp)
            for name, index in self._in:
                interp.set_tensor(index, np.ascontiguousarray(inputs[name]))
            try:
                interp.invoke()
            except (RuntimeError, ValueError) as exc:
                raise InferenceFailed(f"tflite invoke failed: {exc}") from None
            return {name: interp.get_tensor(index).copy() for name, index in self._out}

    def _reallocate(self, interp: Any) -> Any:
        """Allocate for the new input shapes. Some models with dynamic inputs
        cannot be re-prepared once allocated at their placeholder shape (e.g. a
        [-1, -1] audio input allocated as [1, 1]): then a fresh interpreter is
        resized before its first allocation."""
        try:
            interp.allocate_tensors()
            return interp
        except (RuntimeError, ValueError):
            fresh = self._new_interpreter()
            for _, index in self._in:
                fresh.resize_tensor_input(index, list(self._shapes[index]), strict=False)
            try:
                fresh.allocate_tensors()
            except (RuntimeError, ValueError) as exc:
                raise InferenceFailed(f"tflite cannot run these input shapes: {exc}") from None
            self._interpreter = fresh
            return fresh

    def unload(self) -> None:
        with self._lock:
            self._interpreter = None
