"""Typed tensor descriptions shared by bundles, runtimes and transports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edged.errors import InvalidInput

# KServe V2 datatype names <-> numpy dtype names.
V2_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_NUMPY.items()}


# The same maps keyed by dtype object, built once: ``np.dtype(x).name`` costs
# microseconds per call, and the request path asks for every tensor.
_V2_BY_DTYPE: dict[np.dtype, str] = {np.dtype(v): k for k, v in V2_TO_NUMPY.items()}
NUMPY_DTYPES: dict[str, np.dtype] = {k: np.dtype(v) for k, v in V2_TO_NUMPY.items()}


def v2_datatype(dtype: str | np.dtype) -> str:
    """The V2 datatype name (``FP32``) of a numpy dtype."""
    try:
        return _V2_BY_DTYPE[dtype]  # type: ignore[index]
    except (KeyError, TypeError):
        pass
    name = np.dtype(dtype).name
    if name not in NUMPY_TO_V2:
        raise InvalidInput(f"dtype {name} has no KServe V2 datatype")
    return NUMPY_TO_V2[name]


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a V2 datatype name, with a clear error."""
    dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}"
        )
    return dtype


# numpy's clip ufunc itself: np.clip is a Python wrapper around it that costs ~1.2 us a call
# (every request to an int8 model with float inputs clips once); np.clip where it is not there.
_clip = getattr(getattr(getattr(np, "_core", None), "umath", None), "clip", None) or np.clip
_INT_LIMITS = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in (np.int8, np.uint8, np.int16, np.uint16)}


@dataclass(frozen=True)
class Quantization:
    """Affine int8/uint8 quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def quantize(self, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Round half to even, then clip to ``dtype``'s range; in place on one
        temporary array (a request's input passes here on every int8 model)."""
        low, high = _INT_LIMITS.get(np.dtype(dtype)) or (np.iinfo(dtype).min, np.iinfo(dtype).max)
        q = values / self.scale
        np.rint(q, out=q)
        q += self.zero_point
        _clip(q, low, high, out=q)
        return q.astype(dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        return (values.astype(np.float32) - self.zero_point) * np.float32(self.scale)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Quantization":
        return cls(scale=float(data["scale"]), zero_point=int(data["zero_point"]))


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype, shape (-1 = dynamic), layout and optional quantization.

    ``dtype`` is the model's native dtype (numpy name). For a quantized tensor
    the daemon also accepts and returns ``float32`` and converts with
    ``quantization``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    layout: str = ""
    quantization: Quantization | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def datatype(self) -> str:
        return v2_datatype(self.dtype)

    def accepted_dtypes(self) -> tuple[str, ...]:
        """Dtypes a client may send: native, plus float32 for quantized tensors."""
        if self.quantization is not None:
            return (self.dtype, "float32")
        return (self.dtype,)

    def matches_shape(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape)
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "layout": self.layout,
        }
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        quant = data.get("quantization")
        return cls(
            name=str(data["name"]),
            dtype=np.dtype(data["dtype"]).name,
            shape=tuple(int(d) for d in data["shape"]),
            layout=str(data.get("layout", "")),
            quantization=Quantization.from_dict(quant) if quant else None,
        )
