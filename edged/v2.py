"""KServe V2 inference payloads, with Triton's binary tensor data extension.

Shared by the HTTP and MQTT transports, so both accept the same JSON.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edged.dataplane import InferenceRequest, InferenceResponse
from edged.errors import InvalidInput
from edged.json_numbers import SimdNumbers
from edged.tensors import NUMPY_DTYPES, numpy_dtype, v2_datatype

try:  # orjson, as MLServer uses: several times faster, numpy arrays serialized in C
    import orjson
except ImportError:  # pragma: no cover - the stdlib fallback
    orjson = None  # type: ignore[assignment]

HEADER_LENGTH = "Inference-Header-Content-Length"
# Flat numeric "data" lists at least this long are parsed in pieces (see _parse_numbers).
FAST_DATA_MIN_BYTES = 64 * 1024
FAST_DATA_CHUNK_BYTES = 128 * 1024  # parsed in pieces (~0.15 ms each with simdjson), so the GIL is let go between them


@dataclass
class DecodedRequest:
    request: InferenceRequest
    binary_outputs: set[str]  # names to return as binary
    all_binary: bool  # binary_data_output: every output as binary


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON; InvalidInput (never a RecursionError) for anything malformed."""
    try:
        if orjson is not None:
            return orjson.loads(raw)
        return json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)
    except RecursionError:
        raise InvalidInput("malformed JSON in request body: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # orjson.JSONDecodeError and json's are ValueErrors
        raise InvalidInput(f"malformed JSON in request body: {exc}") from None


def dumps(data: Any) -> bytes:
    """Compact JSON; numpy arrays become lists (in C with orjson)."""
    if orjson is not None:
        return orjson.dumps(data, default=_to_list, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(data, separators=(",", ":"), default=_to_list).encode()


def _to_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parse_json_object(raw: bytes, expected: str = "a JSON object with an 'inputs' list") -> dict[str, Any]:
    """Decode a JSON object body, or raise InvalidInput saying what was wrong."""
    data = loads(raw)
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be {expected}")
    return data


def _object(value: Any, where: str | Callable[[], str]) -> dict[str, Any]:
    """``value`` as a JSON object (None -> {}), or InvalidInput naming ``where``
    (a callable when the name costs an f-string: made only on the error path)."""
    if type(value) is dict:
        return value
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where() if callable(where) else where} must be a JSON object, got {type(value).__name__}")
    return value


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if type(shape) is list and len(shape) <= 32:
        for d in shape:  # type() and not isinstance(): a JSON true is not a dimension
            if type(d) is not int or d < 0 or d >= 2**62:
                break
        else:
            return tuple(shape)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name}: 'shape' must be a list of non-negative integers, got {shape!r}")
    raise InvalidInput(f"input {name}: shape {shape} is too large (at most 32 dims)")


# -- long flat "data" lists: parsed piece by piece -------------------------------------
def _parse_numbers(name: str, text: "_DataText", dtype: np.dtype, datatype: str, count: int,
                   reserve: Callable[[int], None]) -> np.ndarray:
    """The numbers of ``1.5, 2, -3e4`` as ``dtype``, into one array of ``count`` made up
    front (``reserve`` is told its size first). Parsed in pieces of about
    FAST_DATA_CHUNK_BYTES, so the Python floats of only one piece exist at a time
    and other threads (the event loop) get the GIL between pieces (simdjson holds
    it while it parses, too). Floats are read by simdjson where the text has it
    (``text.numbers``), else and for any piece it refuses by orjson, which then
    decides. More or fewer numbers than ``count``: the array has what was found
    (the caller names the mismatch)."""
    raw, start, stop = text.raw, text.start, text.stop
    numbers = text.numbers if dtype.kind == "f" else None
    plausible = count <= (stop - start) // 2 + 1  # each number takes a digit and a comma
    if plausible:
        reserve(count * dtype.itemsize)
    out = np.empty(count if plausible else 0, dtype)
    filled = 0
    while True:
        end = raw.find(b",", min(start + FAST_DATA_CHUNK_BYTES, stop), stop)
        end = stop if end < 0 else end
        piece = _load_piece(raw, start, end, numbers.doubles) if numbers is not None else None
        if piece is None or not piece.size:  # refused by simdjson (or empty): orjson decides
            piece = _orjson_piece(name, raw, start, end, dtype, datatype, filled > 0 or end < stop)
        if filled + piece.size <= out.size:
            out[filled:filled + piece.size] = piece
        filled += piece.size
        if end >= stop:
            break
        start = end + 1
    if filled != out.size:  # a count mismatch, named by the caller: only the size is used, so no memory
        return np.broadcast_to(np.zeros(1, dtype), (filled,))
    return out


def _orjson_piece(name: str, raw: bytes | bytearray, start: int, end: int, dtype: np.dtype, datatype: str,
                  not_alone: bool) -> np.ndarray:
    """``raw[start:end]``'s numbers as ``dtype`` by orjson, or InvalidInput naming what is
    wrong (an empty piece is malformed when it is ``not_alone`` in its list)."""
    try:
        values = _load_piece(raw, start, end)
    except InvalidInput:
        values = None
    if values is None or (not values and not_alone):
        raise InvalidInput(f"malformed JSON in request body: input {name}: 'data' is not a list of numbers")
    piece = _floats(values, dtype) if dtype.kind == "f" else None
    return piece if piece is not None else _asarray(name, values, dtype, datatype)


def _load_piece(raw: bytes | bytearray, start: int, end: int, parse: Callable[[Any], Any] = loads) -> Any:
    """``raw[start:end]`` parsed by ``parse`` as the items of a JSON list. In a bytearray
    the byte before and the byte at ``end`` (a comma or the list's own brackets) become
    ``[`` and ``]`` for the parse and are put back after it: no copy of the piece."""
    if not isinstance(raw, bytearray) or start < 1 or end >= len(raw):
        return parse(b"[" + raw[start:end] + b"]")
    before, after = raw[start - 1], raw[end]
    raw[start - 1], raw[end] = 0x5B, 0x5D
    try:
        with memoryview(raw) as view:
            return parse(view[start - 1:end + 1])
    finally:
        raw[start - 1], raw[end] = before, after


def _floats(values: list[Any], dtype: np.dtype) -> np.ndarray | None:
    """``values`` as floats (numpy's fromiter: ~15% faster than asarray from a list),
    or None where it fails (asarray then names the problem)."""
    try:
        return np.fromiter(values, dtype, len(values))
    except (TypeError, ValueError, OverflowError):
        return None


def _asarray(name: str, value: Any, dtype: np.dtype, datatype: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"input {name}: 'data' is not a list of {datatype} values") from None


# A list with either of these is left to the full parse: a nested list, a string (its
# commas and brackets would cut the pieces wrongly). true, false, null and {} take the
# pieces: numpy converts them one by one, as it does for the whole list (1.0, 0.0, nan,
# an error), and each memchr pass over a 3 MB body costs ~0.15 ms.
_NOT_NUMERIC = (b"[", b'"')
_BLANK = b" \t\r\n"


def _skip_blank(raw: bytes, at: int) -> int:
    while at < len(raw) and raw[at] in _BLANK:
        at += 1
    return at


def _data_lists(raw: bytes) -> list[tuple[int, int, int]]:
    """``(key, start, stop)`` of each long flat ``"data": [...]`` list in ``raw``: the
    key's offset and the list's text between its brackets. Found with ``bytes.find``
    (memchr, under 1 ms for 3 MB), not a regular expression (about 6 ms); a list with
    a nested list or a string in it is left to the full parse."""
    found: list[tuple[int, int, int]] = []
    key = raw.find(b'"data"')
    while key >= 0:
        colon = _skip_blank(raw, key + 6)
        start = _skip_blank(raw, colon + 1) + 1 if colon < len(raw) and raw[colon] == 0x3A else 0
        next_from = key + 6
        if start and start <= len(raw) and raw[start - 1] == 0x5B:  # '['
            stop = raw.find(b"]", start)
            if stop < 0:
                break
            if stop - start >= FAST_DATA_MIN_BYTES and all(raw.find(c, start, stop) < 0 for c in _NOT_NUMERIC):
                found.append((key, start, stop))
                next_from = stop + 1
        key = raw.find(b'"data"', next_from)
    return found


def _split_data(raw: bytes, tag: str, simd_json: bool = True) -> tuple[bytes, list["_DataText"]]:
    """The body with each long flat ``"data": [...]`` list swapped for a placeholder
    string (``tag`` and its index), and those lists' texts (read by one simdjson
    parser where ``simd_json`` and pysimdjson is installed)."""
    parts, segments, last = [], [], 0
    numbers: SimdNumbers | None = None
    for key, start, stop in _data_lists(raw):
        if not segments and simd_json:
            numbers = SimdNumbers.create()
        parts.append(raw[last:key])
        parts.append(b'"data":"%s%d"' % (tag.encode(), len(segments)))
        segments.append(_DataText(raw, start, stop, numbers))
        last = stop + 1
    if not segments:
        return raw, []
    parts.append(raw[last:])
    return b"".join(parts), segments


def parse_request_json(raw: bytes, simd_json: bool = True) -> dict[str, Any]:
    """A V2 request's JSON object; long flat numeric ``data`` lists come back as
    unparsed bytes (``_DataText``) that :func:`decode_request` reads into numpy
    (with simdjson where ``simd_json`` and it is installed, else with orjson)."""
    if len(raw) < FAST_DATA_MIN_BYTES:
        return parse_json_object(raw)
    tag = f"edged-data-{secrets.token_hex(8)}-"  # a client cannot guess it
    skeleton, segments = _split_data(raw, tag, simd_json)
    if segments:
        data = parse_json_object(skeleton)
        found = _swap_placeholders(data, segments, tag)
        if found == len(segments):
            return data
        # a placeholder was not where an input's data goes: parse the body as sent
    return parse_json_object(raw)


@dataclass
class _DataText:
    """Where a long numeric ``data`` list's text is in the body (not copied), and the
    simdjson parser of the body's lists (None: orjson parses them)."""

    raw: bytes
    start: int
    stop: int
    numbers: SimdNumbers | None = None


def _swap_placeholders(data: dict[str, Any], segments: list[_DataText], tag: str) -> int:
    """Put each segment where its placeholder is (an input's ``data``); the count placed."""
    inputs = data.get("inputs")
    placed: set[int] = set()
    if not isinstance(inputs, list):
        return -1
    for tensor in inputs:
        value = tensor.get("data") if isinstance(tensor, dict) else None
        if isinstance(value, str) and value.startswith(tag):
            index = value[len(tag):]
            if not index.isdigit() or int(index) >= len(segments) or int(index) in placed:
                return -1
            placed.add(int(index))
            tensor["data"] = segments[int(index)]
    return len(placed)


def _tensor_from_data(name: str, value: Any, dtype: np.dtype, datatype: str, count: int,
                      reserve: Callable[[int], None]) -> np.ndarray:
    if isinstance(value, _DataText):
        return _parse_numbers(name, value, dtype, datatype, count, reserve)
    array = _asarray(name, value, dtype, datatype)
    reserve(array.nbytes)
    return array


def decode_request(model: str, version: str | None, body: bytes, header_length: int | None,
                   reserve: Callable[[int], None] = lambda nbytes: None, simd_json: bool = True) -> DecodedRequest:
    """Parse a V2 infer request. ``header_length`` is the value of the
    Inference-Header-Content-Length header when binary data follows the JSON.
    ``reserve`` is told the bytes of each tensor made from JSON data (it may raise
    to refuse the request). ``simd_json=False`` reads long number lists with
    orjson even where pysimdjson is installed."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes"
            )
        data = parse_request_json(body[:header_length], simd_json)
        start, end = header_length, len(body)
    else:
        data = parse_request_json(body, simd_json)
        start = end = 0
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
        dtype = NUMPY_DTYPES.get(datatype) if type(datatype) is str else None
        if dtype is None:
            if not isinstance(datatype, str):
                raise InvalidInput(f"input {name}: missing 'datatype'")
            if datatype == "BYTES":
                raise InvalidInput(f"input {name}: datatype BYTES is not supported; send a numeric tensor")
            try:
                dtype = numpy_dtype(datatype)
            except InvalidInput as exc:
                raise InvalidInput(f"input {name}: {exc}") from None
        count = math.prod(shape)
        params = _object(tensor.get("parameters"), lambda: f"input {name}: 'parameters'")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            expected = count * dtype.itemsize
            if not isinstance(size, int) or isinstance(size, bool) or size != expected:
                raise InvalidInput(
                    f"input {name}: binary_data_size is {size!r} but shape {list(shape)} of {datatype} needs {expected} bytes"
                )
            if start + offset + size > end:
                raise InvalidInput(
                    f"input {name}: needs {size} bytes of binary data at offset {offset}, "
                    f"but only {end - start - offset} remain"
                )
            try:  # a view into the body, shaped at once: no copy
                inputs[name] = np.ndarray(shape, dtype, body, start + offset) if count else np.empty(shape, dtype)
            except (ValueError, TypeError):
                raise InvalidInput(f"input {name}: shape {list(shape)} is not a valid array shape") from None
            offset += size
            continue
        else:
            if "data" not in tensor:
                raise InvalidInput(f"input {name}: has neither 'data' nor parameters.binary_data_size")
            array = _tensor_from_data(name, tensor["data"], dtype, datatype, count, reserve)
            if array.size != count:
                raise InvalidInput(
                    f"input {name}: shape {list(shape)} needs {count} elements, got {array.size}"
                )
        try:
            inputs[name] = array.reshape(shape)
        except ValueError:
            raise InvalidInput(f"input {name}: shape {list(shape)} is not a valid array shape") from None
    if offset != end - start:
        raise InvalidInput(
            f"request has {end - start} bytes of binary data but inputs declare {offset}"
        )
    params = _object(data.get("parameters"), "request 'parameters'")
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
            if _object(out.get("parameters"), lambda: f"output {out['name']}: 'parameters'").get("binary_data", False):
                binary_outputs.add(out["name"])
    request_id = data.get("id")
    if request_id is not None and (not isinstance(request_id, (str, int, float)) or isinstance(request_id, bool)):
        raise InvalidInput(f"request 'id' must be a string, got {type(request_id).__name__}")
    request = InferenceRequest(
        model=model,
        version=version or None,
        inputs=inputs,
        outputs=requested or None,
        id=str(request_id) if request_id is not None else None,
        parameters=params,
    )
    return DecodedRequest(request=request, binary_outputs=binary_outputs, all_binary=all_binary)


def response_bytes(response: InferenceResponse) -> int:
    """About how many bytes the response's outputs take (to pick a thread for encoding)."""
    return sum(int(a.nbytes) for a in response.outputs.values())


def encode_response(response: InferenceResponse, binary_outputs: set[str], all_binary: bool) -> tuple[bytes, int | None]:
    """JSON (and binary) body for a response; the int is the header length
    to send as Inference-Header-Content-Length, or None for pure JSON."""
    outputs = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape)}
        if all_binary or name in binary_outputs:
            blob = array.tobytes()  # C order whatever the array's layout
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)  # a list, written in C by orjson
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id is not None:
        body["id"] = response.id
    header = dumps(body)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
