"""Inference backends, one module each, behind the ``Runtime`` protocol.

Backend libraries are imported lazily, inside ``load``. A missing library makes
that runtime unavailable with a clear message; importing this package never
fails because of one.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edged.errors import RuntimeUnavailable
from edged.tensors import TensorSpec


@dataclass(frozen=True)
class RuntimeOptions:
    """Options shared by all backends; ``extra`` holds backend-specific ones
    (e.g. ``providers`` for onnx, ``device`` and ``performance_hint`` for openvino)."""

    threads: int = 0  # 0: the backend's default
    extra: dict[str, Any] = field(default_factory=dict)


class Runtime(Protocol):
    """A loaded model in one backend. ``infer`` takes and returns the model's
    native dtypes; conversion and validation happen in ``edged.model``."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def load(self, model_path: str, options: RuntimeOptions) -> None: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def unload(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # edged module implementing it
    cls: str
    libraries: tuple[str, ...]  # importable names, first found wins
    extra: str  # pip extra that installs it

    def library(self) -> str | None:
        for lib in self.libraries:
            try:
                if importlib.util.find_spec(lib) is not None:
                    return lib
            except (ImportError, ValueError):
                continue
        return None


BACKENDS: dict[str, Backend] = {
    "tflite": Backend(
        "tflite", "edged.runtimes.tflite", "TFLiteRuntime",
        ("ai_edge_litert", "tflite_runtime", "tensorflow"), "tflite",
    ),
    "onnx": Backend("onnx", "edged.runtimes.onnx", "OnnxRuntime", ("onnxruntime",), "onnx"),
    "openvino": Backend("openvino", "edged.runtimes.openvino", "OpenVinoRuntime", ("openvino",), "openvino"),
}


def create_runtime(name: str) -> Runtime:
    """A fresh, unloaded runtime for ``name``; RuntimeUnavailable when its
    library is missing."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise RuntimeUnavailable(f"unknown runtime {name!r}; known: {', '.join(BACKENDS)}")
    if backend.library() is None:
        raise RuntimeUnavailable(
            f"runtime {name} is not installed: pip install 'edged[{backend.extra}]'"
        )
    module = importlib.import_module(backend.module)
    return getattr(module, backend.cls)()


def runtime_versions() -> dict[str, str | None]:
    """Backend name -> 'library version', or None when not installed."""
    from importlib import metadata

    dists = {
        "ai_edge_litert": "ai-edge-litert",
        "tflite_runtime": "tflite-runtime",
        "tensorflow": "tensorflow",
        "onnxruntime": "onnxruntime",
        "openvino": "openvino",
    }
    result: dict[str, str | None] = {}
    for name, backend in BACKENDS.items():
        lib = backend.library()
        if lib is None:
            result[name] = None
            continue
        try:
            result[name] = f"{dists[lib]} {metadata.version(dists[lib])}"
        except metadata.PackageNotFoundError:
            result[name] = lib
    return result
