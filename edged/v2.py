"""KServe V2 inference payloads, with Triton's binary tensor data extension.

Shared by the HTTP and MQTT transports, so both accept the same JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.dataplane import InferenceRequest, InferenceResponse
from edged.errors import InvalidInput
from edged.tensors import numpy_dtype, v2_datatype

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class DecodedRequest:
    request: InferenceRequest
    binary_outputs: set[str]  # names to return as binary
    all_binary: bool  # binary_data_output: every output as binary


def parse_json_object(raw: bytes, expected: str = "a JSON object with an 'inputs' list") -> dict[str, Any]:
    """Decode a JSON object body, or raise InvalidInput saying what was wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"malformed JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be {expected}")
    return data


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def decode_request(model: str, version: str | None, body: bytes, header_length: int | None) -> DecodedRequest:
    """Parse a V2 infer request. ``header_length`` is the value of the
    Inference-Header-Content-Length header when binary data follows the JSON."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes"
            )
        data = parse_json_object(body[:header_length])
        binary = memoryview(body)[header_length:]
    else:
        data = parse_json_object(body)
        binary = memoryview(b"")
    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in raw_inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput("each input must be an object with a 'name'")
        name = tensor["name"]
        if name in inputs:
            raise InvalidInput(f"input {name} is given twice")
        shape = _shape(tensor, name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name}: missing 'datatype'")
        if datatype == "BYTES":
            raise InvalidInput(f"input {name}: datatype BYTES is not supported; send a numeric tensor")
        try:
            dtype = numpy_dtype(datatype)
        except InvalidInput as exc:
            raise InvalidInput(f"input {name}: {exc}") from None
        count = math.prod(shape)
        params = tensor.get("parameters") or {}
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            expected = count * dtype.itemsize
            if not isinstance(size, int) or size != expected:
                raise InvalidInput(
                    f"input {name}: binary_data_size is {size!r} but shape {list(shape)} of {datatype} needs {expected} bytes"
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name}: needs {size} bytes of binary data at offset {offset}, "
                    f"but only {len(binary) - offset} remain"
                )
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidInput(f"input {name}: has neither 'data' nor parameters.binary_data_size")
            try:
                array = np.asarray(tensor["data"], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInput(f"input {name}: data is not a list of {datatype} values: {exc}") from None
            if array.size != count:
                raise InvalidInput(
                    f"input {name}: shape {list(shape)} needs {count} elements, got {array.size}"
                )
            array = array.reshape(shape)
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInput(
            f"request has {len(binary)} bytes of binary data but inputs declare {offset}"
        )
    params = data.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False))
    requested: list[str] | None = None
    binary_outputs: set[str] = set()
    raw_outputs = data.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        requested = []
        for out in raw_outputs:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInput("each requested output must be an object with a 'name'")
            requested.append(out["name"])
            if (out.get("parameters") or {}).get("binary_data", False):
                binary_outputs.add(out["name"])
    request_id = data.get("id")
    request = InferenceRequest(
        model=model,
        version=version or None,
        inputs=inputs,
        outputs=requested or None,
        id=str(request_id) if request_id is not None else None,
        parameters=params if isinstance(params, dict) else {},
    )
    return DecodedRequest(request=request, binary_outputs=binary_outputs, all_binary=all_binary)


def encode_response(response: InferenceResponse, binary_outputs: set[str], all_binary: bool) -> tuple[bytes, int | None]:
    """JSON (and binary) body for a response; the int is the header length
    to send as Inference-Header-Content-Length, or None for pure JSON."""
    outputs = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape)}
        if all_binary or name in binary_outputs:
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id is not None:
        body["id"] = response.id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
