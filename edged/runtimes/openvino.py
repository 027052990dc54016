"""OpenVINO backend: compiled model with a pool of infer requests."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np

from edged.errors import InferenceFailed
from edged.runtimes import RuntimeOptions
from edged.tensors import TensorSpec


def port_spec(port: Any) -> TensorSpec:
    """A TensorSpec read from an OpenVINO port (dynamic dims -> -1)."""
    shape = tuple(-1 if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(name=port.get_any_name(), dtype=dtype, shape=shape)


class OpenVinoRuntime:
    """A CompiledModel plus a queue of InferRequests, one per concurrent caller."""

    name = "openvino"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._compiled: Any = None
        self._requests: queue.Queue[Any] = queue.Queue()

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": str(options.extra.get("performance_hint", "LATENCY")),
        }
        if options.threads > 0:
            config["INFERENCE_NUM_THREADS"] = options.threads
        device = str(options.extra.get("device", "CPU"))
        self._compiled = core.compile_model(model_path, device, config)
        self.inputs = [port_spec(p) for p in self._compiled.inputs]
        self.outputs = [port_spec(p) for p in self._compiled.outputs]
        for _ in range(int(options.extra.get("requests", 4))):
            self._requests.put(self._compiled.create_infer_request())

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._requests.get()
        try:
            result = request.infer({name: np.ascontiguousarray(a) for name, a in inputs.items()})
            return {
                port.get_any_name(): np.array(result[port], copy=True)
                for port in self._compiled.outputs
            }
        except RuntimeError as exc:
            raise InferenceFailed(f"openvino infer failed: {exc}") from None
        finally:
            self._requests.put(request)

    def unload(self) -> None:
        self._compiled = None
        self._requests = queue.Queue()
