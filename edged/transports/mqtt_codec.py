"""MQTT payloads and properties: raw tensors in, reply properties out.

A raw request is the tensor's bytes with ``dtype`` and ``shape`` (and optionally
``input`` and ``version``) as MQTT v5 user properties, or as parameters of its
Content Type (``application/x-edged-tensor; dtype=FP32; shape="1,1,8,8"``, MIME
parameter syntax, RFC 2045). A reply describes its tensor the way its request
did: user properties, or Content Type parameters (two properties in all with the
Correlation Data instead of six: stock paho parses each at ~10 µs). Replies carry
their properties packed once by hand: building and packing a paho ``Properties``
object costs tens of µs per message in pure Python, more than a small model's
inference.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from edged.dataplane import InferenceRequest
from edged.errors import InvalidInput
from edged.tensors import V2_TO_NUMPY, numpy_dtype, v2_datatype

RAW_CONTENT_TYPE = "application/x-edged-tensor"
JSON_CONTENT_TYPE = "application/json"
RAW_KINDS = "biuf"  # numpy kinds a raw tensor may have: bool, signed, unsigned, float
MAX_DIM = 2**40
MAX_FIELD = 65535  # MQTT strings and binary data carry a two-byte length

# MQTT v5 property identifiers (OASIS MQTT 5.0, section 2.2.2.2)
CONTENT_TYPE_ID = b"\x03"
CORRELATION_DATA_ID = b"\x09"
USER_PROPERTY_ID = b"\x26"


# RFC 2045 parameter: a token name, "=", a token or a quoted string; unquoted values
# may also hold commas (shape=1,1,8,8), which strict MIME would quote.
_TOKEN_CHARS = "[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(r';[ \t]*(' + _TOKEN_CHARS + r')[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;"\s]*)[ \t]*')
_TOKEN = re.compile(_TOKEN_CHARS)
TENSOR_PARAMETERS = ("dtype", "shape", "input", "version")  # what a raw request's Content Type may name


def user_properties(props: Any) -> dict[str, str]:
    return dict(getattr(props, "UserProperty", None) or [])


@functools.lru_cache(maxsize=256)
def content_type_parameters(content_type: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A Content Type's media type (lower case) and its parameters (names lower case,
    quoted values unquoted), memoised: a client sends the same text every request.
    InvalidInput (never memoised) for parameters that do not parse."""
    media = content_type.partition(";")[0]
    rest = content_type[len(media):].rstrip(" \t;")
    params = []
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None:
            raise InvalidInput(f"content type {content_type!r}: parameters must read '; name=value' "
                               f"(a value with ';' or spaces in double quotes)")
        name, value = match.groups()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.append((name.lower(), value))
        pos = match.end()
    return media.strip().lower(), tuple(params)


def raw_parameters(content_type: str) -> dict[str, str] | None:
    """The tensor parameters (``TENSOR_PARAMETERS``) of a raw tensor Content Type with
    parameters; None for any other content type, or the raw one without parameters."""
    if content_type == RAW_CONTENT_TYPE or not content_type.startswith(RAW_CONTENT_TYPE):
        return None
    media, params = content_type_parameters(content_type)
    if media != RAW_CONTENT_TYPE:
        return None
    return {name: value for name, value in params if name in TENSOR_PARAMETERS}


def _parameter_value(value: str) -> str:
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_parameters(media: str, params: list[tuple[str, str]]) -> str:
    """``media`` with MIME parameters (RFC 2045: values quoted unless a token)."""
    return media + "".join(f"; {name}={_parameter_value(value)}" for name, value in params)


def _raw_dtype(name: str) -> np.dtype:
    if name in V2_TO_NUMPY:
        return numpy_dtype(name)
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        raise InvalidInput(f"user property dtype {name!r} is not a V2 datatype (FP32, INT8, ...) or a numeric numpy dtype") from None
    if dtype.kind not in RAW_KINDS or dtype.itemsize == 0:
        raise InvalidInput(f"user property dtype {name!r} is not a numeric dtype (bool, int, uint or float)")
    return dtype


def _raw_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.strip().strip("[]").split(",") if d.strip())
    except ValueError:
        raise InvalidInput(f"user property shape {text!r} is not a list of integers") from None
    if any(d < 0 for d in shape):
        raise InvalidInput(f"user property shape {text!r} has a negative dimension; a raw tensor's shape is exact")
    if any(d > MAX_DIM for d in shape):
        raise InvalidInput(f"user property shape {text!r} has a dimension over {MAX_DIM}")
    return shape


@functools.lru_cache(maxsize=256)
def raw_spec(dtype_text: str, shape_text: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte size that a raw tensor's user properties name. A pure
    function of the two texts, memoised: a client sends the same pair every request.
    InvalidInput (never memoised) for a bad pair."""
    dtype = _raw_dtype(dtype_text)
    shape = _raw_shape(shape_text)
    return dtype, shape, math.prod(shape) * dtype.itemsize  # Python ints: no overflow


def decode_raw(model: str, payload: bytes, user: dict[str, str]) -> InferenceRequest:
    """Raw tensor bytes with dtype and shape (and optionally input) in user properties."""
    if "dtype" not in user or "shape" not in user:
        raise InvalidInput(f"raw tensor payload ({RAW_CONTENT_TYPE}) needs user properties 'dtype' and 'shape' "
                           f"(or Content Type parameters: {RAW_CONTENT_TYPE}; dtype=FP32; shape=\"1,3\")")
    dtype, shape, expected = raw_spec(user["dtype"], user["shape"])
    if len(payload) != expected:
        raise InvalidInput(f"raw tensor of shape {list(shape)} {dtype.name} needs {expected} bytes, got {len(payload)}")
    try:
        array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"raw tensor of shape {list(shape)} {dtype.name} cannot be built: {exc}") from None
    return InferenceRequest(model=model, inputs={user.get("input", ""): array}, version=user.get("version") or None)


def response_topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to (None when it can)."""
    if not topic:
        return "the Response Topic is empty"
    if "+" in topic or "#" in topic:
        return f"the Response Topic {topic!r} contains a wildcard (+ or #); a reply needs a plain topic"
    if "\0" in topic or len(topic.encode()) > MAX_FIELD:
        return "the Response Topic is not a valid topic name"
    return None


def _field(data: bytes) -> bytes:
    if len(data) > MAX_FIELD:
        raise ValueError(f"an MQTT property value of {len(data)} bytes is over the limit of {MAX_FIELD}")
    return len(data).to_bytes(2, "big") + data


def pack_fields(content_type: str, user: list[tuple[str, str]]) -> bytes:
    """Content Type and User Properties in MQTT v5 wire form (no length prefix)."""
    parts = [CONTENT_TYPE_ID, _field(content_type.encode())]
    for key, value in user:
        parts += [USER_PROPERTY_ID, _field(key.encode()), _field(value.encode())]
    return b"".join(parts)


def pack_properties(content_type: str, user: list[tuple[str, str]], correlation: bytes | None) -> bytes:
    """PUBLISH properties in MQTT v5 wire form: length, then each property."""
    return finish_properties(pack_fields(content_type, user), correlation)


def finish_properties(fields: bytes, correlation: bytes | None) -> bytes:
    """``fields`` from pack_fields, the Correlation Data, and the length in front."""
    if correlation is not None:
        fields += CORRELATION_DATA_ID + _field(bytes(correlation))
    return VariableByteIntegers.encode(len(fields)) + fields


class RawReplyFields:
    """The packed Content Type and User Properties of raw tensor replies, kept per
    output name, dtype, shape, model version and form: the same for every reply of a
    model at a fixed batch size. ``in_content_type``: the description goes in Content
    Type parameters instead of user properties. Bounded; safe to share between threads."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._packed: dict[tuple[str, np.dtype, tuple[int, ...], str, bool], bytes] = {}

    def get(self, name: str, dtype: np.dtype, shape: tuple[int, ...], version: str,
            in_content_type: bool = False) -> bytes:
        key = (name, dtype, shape, version, in_content_type)
        fields = self._packed.get(key)
        if fields is None:
            if len(self._packed) >= self.limit:
                self._packed.clear()
            user = [("output", name), ("dtype", v2_datatype(dtype)), ("shape", ",".join(map(str, shape))),
                    ("model_version", version)]
            if in_content_type:
                fields = pack_fields(with_parameters(RAW_CONTENT_TYPE, user), [])
            else:
                fields = pack_fields(RAW_CONTENT_TYPE, user)
            self._packed[key] = fields
        return fields


class PackedProperties(Properties):
    """PUBLISH properties already in wire form; paho only calls ``pack()`` on the
    properties it sends. The base class's per-object tables (8 µs) are not built."""

    def __init__(self, packed: bytes) -> None:  # noqa: super().__init__ left out on purpose
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", packed)

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:  # paho's debug log prints the properties
        return f"[{len(self.packed)} bytes of packed properties]"


def reply_properties(fields: bytes, correlation: bytes | None) -> Properties:
    """Properties for a reply: ``fields`` from pack_fields, with the request's Correlation Data."""
    return PackedProperties(finish_properties(fields, correlation))
