"""What one V2 decode decides, for tests that compare the long-list paths with
the plain parse of the whole body."""

from __future__ import annotations

import warnings

from edged import v2
from edged.errors import InvalidInput


def outcome(body: bytes | bytearray, header_length: int | None = None, simd_json: bool = True):
    """("ok", {name: array}) or ("error", message) for one decode."""
    try:
        with warnings.catch_warnings():  # a number out of float32 range: numpy warns on every path
            warnings.simplefilter("ignore", RuntimeWarning)
            decoded = v2.decode_request("m", None, body, header_length, simd_json=simd_json)
    except InvalidInput as exc:
        return "error", exc.message
    return "ok", decoded.request.inputs


def plain(body: bytes, header_length: int | None = None):
    """The decode without the long-list path: one orjson.loads of the whole body."""
    saved = v2.FAST_DATA_MIN_BYTES
    v2.FAST_DATA_MIN_BYTES = 1 << 62
    try:
        return outcome(body, header_length)
    finally:
        v2.FAST_DATA_MIN_BYTES = saved
