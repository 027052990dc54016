"""Binary infer requests and responses whose JSON header was seen before: made without
writing or parsing it again.

A client of the binary tensor extension sends the same JSON header with every request
of one shape (tritonclient, perf_analyzer, edged's own clients): only the tensor bytes
after it change. ``BinaryLayouts`` keeps what :func:`edged.v2.decode_request` made of a
header (input names, shapes, dtypes and offsets, the outputs asked for, id,
parameters), learnt from a request it decoded, and makes the next request with the
same header bytes and the same number of tensor bytes from it: the same arrays (views
into the body) and the same request, without the JSON parse and its checks, which
depend on nothing else. ``BinaryResponses`` does the same for the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.dataplane import InferenceRequest, InferenceResponse
from edged.v2 import DecodedRequest, encode_response

MAX_HEADER_BYTES = 4096  # longer JSON headers are parsed each time
MAX_LAYOUTS = 64  # headers remembered; when full, all are forgotten and learnt again


@dataclass(frozen=True)
class BinaryLayout:
    """What one JSON header of an all-binary request decodes to."""

    inputs: tuple[tuple[str, tuple[int, ...], np.dtype, int], ...]  # name, shape, dtype, offset in the tensor bytes
    size: int  # tensor bytes after the header
    outputs: tuple[str, ...] | None
    binary_outputs: set[str]
    all_binary: bool
    id: str | None
    parameters: dict[str, Any]

    def decode(self, model: str, version: str | None, body: bytes | bytearray, header_length: int) -> DecodedRequest:
        inputs = {name: np.ndarray(shape, dtype, body, header_length + offset)
                  for name, shape, dtype, offset in self.inputs}
        request = InferenceRequest(model=model, version=version or None, inputs=inputs,
                                   outputs=list(self.outputs) if self.outputs else None, id=self.id,
                                   parameters=dict(self.parameters))
        return DecodedRequest(request=request, binary_outputs=self.binary_outputs, all_binary=self.all_binary)


class BinaryLayouts:
    """Layouts of recently seen JSON headers (at most MAX_LAYOUTS, each at most
    MAX_HEADER_BYTES long). Safe to share between threads."""

    def __init__(self) -> None:
        self._layouts: dict[bytes, BinaryLayout] = {}

    def __len__(self) -> int:
        return len(self._layouts)

    def decode(self, model: str, version: str | None, body: bytes | bytearray,
               header_length: int) -> DecodedRequest | None:
        """The request, when a header of these bytes was learnt and the body has as many
        tensor bytes after it as that one; else None (decode it with decode_request)."""
        if header_length > MAX_HEADER_BYTES or not self._layouts:
            return None
        layout = self._layouts.get(bytes(body[:header_length]))
        if layout is None or len(body) - header_length != layout.size:
            return None
        if len(layout.inputs) != 1:
            return layout.decode(model, version, body, header_length)
        name, shape, dtype, offset = layout.inputs[0]  # layout.decode for one input, one call less
        outputs = layout.outputs
        request = InferenceRequest(model=model, version=version or None,
                                   inputs={name: np.ndarray(shape, dtype, body, header_length + offset)},
                                   outputs=list(outputs) if outputs else None, id=layout.id,
                                   parameters=dict(layout.parameters))
        return DecodedRequest(request=request, binary_outputs=layout.binary_outputs, all_binary=layout.all_binary)

    def learn(self, body: bytes | bytearray, header_length: int, decoded: DecodedRequest) -> None:
        """Remember what decode_request made of ``body``: only when every input is a
        non-empty view into its tensor bytes (none came from JSON data)."""
        if header_length > MAX_HEADER_BYTES or header_length < 0:
            return
        layout = _layout_of(body, header_length, decoded)
        if layout is None:
            return
        if len(self._layouts) >= MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[bytes(body[:header_length])] = layout


def _layout_of(body: bytes | bytearray, header_length: int, decoded: DecodedRequest) -> BinaryLayout | None:
    request = decoded.request
    size = len(body) - header_length
    if size <= 0 or not request.inputs:
        return None
    base = np.frombuffer(body, np.uint8).ctypes.data + header_length
    inputs = []
    expected = 0  # decode_request lays the inputs out one after the other, in order
    for name, array in request.inputs.items():
        if array.size == 0 or not array.flags.c_contiguous or array.ctypes.data - base != expected:
            return None
        inputs.append((name, tuple(array.shape), array.dtype, expected))
        expected += array.nbytes
    if expected != size:
        return None
    return BinaryLayout(inputs=tuple(inputs), size=size,
                        outputs=tuple(request.outputs) if request.outputs else None,
                        binary_outputs=set(decoded.binary_outputs), all_binary=decoded.all_binary,
                        id=request.id, parameters=dict(request.parameters))


class BinaryResponses:
    """The JSON headers of recent all-binary responses (at most MAX_LAYOUTS): a model
    answers each request of one shape with outputs of the same names, dtypes and
    shapes, so the header :func:`edged.v2.encode_response` writes for them is made
    once and the answer is that header and the output bytes. Safe to share between
    threads."""

    def __init__(self) -> None:
        self._headers: dict[tuple, bytes] = {}

    def encode(self, response: InferenceResponse, binary_outputs: set[str],
               all_binary: bool) -> tuple[bytes, int | None]:
        """What ``encode_response(response, binary_outputs, all_binary)`` returns."""
        outputs = response.outputs
        if not all_binary and not all(name in binary_outputs for name in outputs):
            return encode_response(response, binary_outputs, all_binary)  # some output goes as JSON data
        if len(outputs) == 1:
            for name, array in outputs.items():
                key: tuple = (response.model, response.version, response.id, name, array.dtype, array.shape)
        else:
            key = (response.model, response.version, response.id,
                   tuple([(name, array.dtype, array.shape) for name, array in outputs.items()]))
        header = self._headers.get(key)
        if header is None:
            payload, length = encode_response(response, binary_outputs, all_binary)
            if len(self._headers) >= MAX_LAYOUTS:
                self._headers.clear()
            if length is not None:
                self._headers[key] = payload[:length]
            return payload, length
        if len(outputs) == 1:
            for array in outputs.values():
                return header + array.tobytes(), len(header)
        return b"".join([header, *[array.tobytes() for array in outputs.values()]]), len(header)
