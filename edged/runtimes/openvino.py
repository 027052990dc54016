"""OpenVINO backend: compiled model with a pool of infer requests."""

from __future__ import annotations

import queue
import sys
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


# `import openvino` also imports its model-conversion API (openvino.tools.ovc, for
# openvino.convert_model): the TensorFlow frontend, absl and openvino_telemetry, which
# starts a thread to send usage data. Serving needs none of it (about 16 MB of RSS).
_CONVERTER_MODULE = "openvino.tools.ovc"


def import_openvino() -> Any:
    """``openvino`` without its converter loaded. openvino imports the converter
    inside ``try/except ImportError`` (it is optional), so a ``None`` in
    ``sys.modules`` skips it; the entry is removed afterwards, and
    ``openvino.convert_model`` imports the converter on its first call (edged
    convert may load a bundle before it converts, in the same process)."""
    loaded = sys.modules.get("openvino")
    if loaded is not None:
        return loaded
    blocked = _CONVERTER_MODULE not in sys.modules
    if blocked:
        sys.modules[_CONVERTER_MODULE] = None  # type: ignore[assignment]
    try:
        import openvino
    finally:
        if blocked and sys.modules.get(_CONVERTER_MODULE, 0) is None:
            del sys.modules[_CONVERTER_MODULE]
    if blocked and not hasattr(openvino, "convert_model"):
        openvino.convert_model = _convert_model
    return openvino


def _convert_model(*args: Any, **kwargs: Any) -> Any:
    """``openvino.convert_model``, its module imported when first called."""
    from openvino.tools.ovc import convert_model

    return convert_model(*args, **kwargs)


class OpenVinoRuntime:
    """A CompiledModel plus a queue of InferRequests, one per concurrent caller."""

    name = "openvino"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._compiled: Any = None
        self._requests: queue.Queue[Any] = queue.Queue()

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        ov = import_openvino()
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
