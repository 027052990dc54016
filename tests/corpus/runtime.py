"""Run corpus models with their own runtimes (onnxruntime, ai_edge_litert), sample by sample.

Also splits a calibration dict into samples with the converters' ``.npz`` convention: for an
input of model rank r, an array of rank r holds samples along dim 0 (sample i is ``a[i:i+1]``),
an array of rank r+1 holds them along a new leading axis (sample i is ``a[i]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (None for a dynamic dim) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


_ONNX_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


class Runner:
    """One loaded model (.onnx or .tflite) that runs one sample at a time."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.format = "tflite" if self.path.suffix == ".tflite" else "onnx"
        if self.format == "onnx":
            import onnxruntime as ort
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            opts.log_severity_level = 3
            self._sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self.inputs = [self._onnx_spec(t) for t in self._sess.get_inputs()]
            self.outputs = [self._onnx_spec(t) for t in self._sess.get_outputs()]
        else:
            from ai_edge_litert.interpreter import Interpreter
            self._interp = Interpreter(model_path=str(self.path), num_threads=2)
            self._allocated = False  # allocated on the first run, after any resize
            self._in = self._interp.get_input_details()
            self._out = self._interp.get_output_details()
            self.inputs = [self._tflite_spec(d) for d in self._in]
            self.outputs = [self._tflite_spec(d) for d in self._out]

    @staticmethod
    def _onnx_spec(t) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in (t.shape or []))
        return TensorSpec(t.name, shape, np.dtype(_ONNX_DTYPES.get(t.type, np.float32)))

    @staticmethod
    def _tflite_spec(d) -> TensorSpec:
        sig = d.get("shape_signature", d["shape"])
        shape = tuple(int(v) if v > 0 else None for v in sig)
        return TensorSpec(d["name"], shape, np.dtype(d["dtype"]))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one sample (each input at the model's full shape)."""
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise KeyError(f"{self.path.name}: no data for input(s) {', '.join(missing)}")
        if self.format == "onnx":
            return self._sess.run(None, {s.name: np.asarray(feeds[s.name], s.dtype) for s in self.inputs})
        resized = not self._allocated
        for det in self._in:
            value = np.asarray(feeds[det["name"]], det["dtype"])
            if tuple(det["shape"]) != value.shape:
                self._interp.resize_tensor_input(det["index"], list(value.shape), strict=False)
                resized = True
        if resized:
            self._interp.allocate_tensors()
            self._allocated = True
            self._in = self._interp.get_input_details()
            self._out = self._interp.get_output_details()
        for det in self._in:
            self._interp.set_tensor(det["index"], np.asarray(feeds[det["name"]], det["dtype"]))
        self._interp.invoke()
        return [self._interp.get_tensor(d["index"]).copy() for d in self._out]


def sample_count(data: dict[str, np.ndarray], specs: list[TensorSpec]) -> int:
    """Number of samples N in a calibration dict (checked to be the same for every input)."""
    counts = {np.asarray(data[s.name]).shape[0] if np.asarray(data[s.name]).ndim else -1 for s in specs}
    if len(counts) != 1:
        raise ValueError(f"inputs hold different sample counts: {sorted(counts)}")
    return counts.pop()


def iter_samples(data: dict[str, np.ndarray], specs: list[TensorSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Yield one feed dict per sample, following the ``.npz`` rank convention."""
    n = sample_count(data, specs)
    for i in range(n):
        feed = {}
        for spec in specs:
            arr = np.asarray(data[spec.name])
            if arr.ndim == len(spec.shape) + 1:
                feed[spec.name] = arr[i]
            elif arr.ndim == len(spec.shape):
                feed[spec.name] = arr[i:i + 1]
            else:
                raise ValueError(f"input {spec.name}: array rank {arr.ndim} fits neither the model "
                                 f"rank {len(spec.shape)} nor rank {len(spec.shape) + 1}")
        yield feed


def run_all(runner: Runner, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run every sample; return each output stacked along a new leading sample axis."""
    outs = [runner.run(feed) for feed in iter_samples(data, runner.inputs)]
    return [np.stack([o[k] for o in outs]) for k in range(len(runner.outputs))]
