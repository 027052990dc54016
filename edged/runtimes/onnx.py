"""ONNX Runtime backend."""

from __future__ import annotations

from typing import Any

import numpy as np

from edged.errors import ConfigError, InferenceFailed
from edged.runtimes import RuntimeOptions
from edged.tensors import TensorSpec

# onnx type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
    return TensorSpec(name=node.name, dtype=_ORT_TYPES.get(node.type, "float32"), shape=shape)


class OnnxRuntime:
    """An InferenceSession; ``run`` is thread-safe so no lock is needed."""

    name = "onnx"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._session: Any = None
        self._output_names: list[str] = []
        self._run: Any = None  # (output names, feeds, run options) -> results
        self._run_options: Any = None

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if options.threads > 0:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        arena = options.extra.get("cpu_mem_arena", True)
        if not isinstance(arena, bool):
            raise ConfigError(f"runtime_options.onnx.cpu_mem_arena must be true or false, got {arena!r}")
        # The arena keeps the largest intermediate tensors of any run; without it a
        # CNN's activations go back to malloc after each run (e.g. 119 -> 87 MB RSS
        # for a 416x416 detector after a few runs), at the cost of allocating per run.
        so.enable_cpu_mem_arena = arena
        wanted = list(options.extra.get("providers") or ["CPUExecutionProvider"])
        present = set(ort.get_available_providers())
        providers = [p for p in wanted if p in present] or ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(model_path, sess_options=so, providers=providers)
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._run = _direct_run(self._session)
        # Read-only during a run, so one serves all threads; the C++ run makes a default
        # RunOptions per call when given None (about 2 us).
        self._run_options = ort.RunOptions()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._run(self._output_names, inputs, self._run_options)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceFailed(f"onnxruntime run failed: {exc}") from None
        return dict(zip(self._output_names, results))

    def unload(self) -> None:
        self._session = None
        self._run = None


def _direct_run(session: Any) -> Any:
    """The C++ session's own ``run`` for a session on the CPU provider alone: the Python
    ``InferenceSession.run`` around it checks feeds the model's inputs were already
    checked against (``LoadedModel.validate``), graph capture (WebGPU only) and
    falls back to other providers (there are none). Any other session: its ``run``."""
    inner = getattr(session, "_sess", None)
    if inner is None or not callable(getattr(inner, "run", None)) or session.get_providers() != ["CPUExecutionProvider"]:
        return session.run
    return inner.run
