"""The lean path for the request that must be fast: ``POST /v2/models/M[/versions/V]/infer``
on a keep-alive HTTP/1.1 connection.

aiohttp stays the server: this only reads requests that are plainly what the hot
path expects (strict request line, no transfer or content coding, no ``Expect``,
``Connection`` only ``keep-alive``, one Content-Length of at most http.max_body_bytes)
and answers them from the connection's protocol (``edged.transports.http_conn._Watched``)
without aiohttp's request, task and response objects, with the steps and the
answer bytes of ``HttpTransport.infer``. A body of up to 64 KiB is gathered from the
reads; a bigger one still arriving is read straight into one buffer of its size
(``edged.transports.http_body.BodyReader``) once its checks pass and its bytes are reserved,
and decoded in a worker thread as on the aiohttp path. A model that runs in a worker
thread or the batcher is answered by a coroutine; the connection reads on when it is sent.

Anything else goes to aiohttp byte for byte: a plain request (another route, a
failed token check, an unknown model) on its own, after which the connection comes
back here once aiohttp has answered it (``frame``); anything else (chunked, an
upgrade, a body still streaming in that the lean path does not take) with all the
bytes after it, and aiohttp keeps that connection.

This module reads the requests and makes the answers' bytes; the handler that
answers them, ``LeanInfer``, is in ``edged.transports.http_fast_infer``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Mapping, NamedTuple

from aiohttp.http import SERVER_SOFTWARE

from edged.errors import EdgedError
from edged.transports.http import BINARY_TYPE, error_response
from edged.v2 import HEADER_LENGTH

log = logging.getLogger(__name__)

REQUEST_LINE = re.compile(
    rb"POST /v2/models/([A-Za-z0-9_][A-Za-z0-9_.-]{0,199})(?:/versions/([A-Za-z0-9_][A-Za-z0-9_.-]{0,99}))?/infer HTTP/1\.1"
)
# Header lines, each CRLF-ended, as RFC 9110 spells a token name and a visible-ASCII value
# (no obs-fold, no obs-text, no bare CR or LF).
HEADER_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}:[ \t]*(?:[\x21-\x7e][\x20-\x7e\t]*)?\r\n){0,64}")
ANY_REQUEST_LINE = re.compile(rb"[A-Z]{1,16} /[\x21-\x7e]{0,8000} HTTP/1\.1")
DIGITS = re.compile(rb"[0-9]{1,15}")
REQUEST_START = b"POST "
# Headers that change how aiohttp frames or reads a request: such requests go to aiohttp.
FRAMING = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade", b"te", b"trailer",
                     b"http2-settings", b"keep-alive"})
MAX_HEAD_BYTES = 8190  # aiohttp's own line limit; longer heads go to aiohttp, which enforces its limits
MAX_HEADS = 64  # heads HeadCache remembers
SERVER = SERVER_SOFTWARE.encode()
HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()


@dataclass
class LeanRequest:
    """A parsed infer request; header names are lower case, values stripped.
    ``header_length``: Inference-Header-Content-Length, -1 when it is not a number."""

    model: str
    version: str | None
    headers: Mapping[bytes, bytes]
    body: bytearray
    header_length: int | None = None


class Head(NamedTuple):
    """A lean request's head: ``size`` body bytes follow from offset ``start``."""

    model: str
    version: str | None
    headers: Mapping[bytes, bytes]
    size: int
    header_length: int | None
    start: int


MORE_HEAD = -1  # parse(): the head has not all arrived yet


def parse_head(buffer: bytes | bytearray, max_body_bytes: int, at: int = 0) -> Head | int | None:
    """The head of the request at offset ``at`` of ``buffer`` (its body may still be
    arriving); MORE_HEAD while the head is; None as :func:`parse`."""
    end = buffer.find(b"\r\n\r\n", at, at + MAX_HEAD_BYTES + 4)
    if end < 0:
        return MORE_HEAD if _may_become_lean(bytes(buffer[at:at + MAX_HEAD_BYTES])) else None
    line_end = buffer.find(b"\r\n", at, end + 2)
    first = REQUEST_LINE.fullmatch(buffer, at, line_end)
    if first is None or HEADER_LINES.fullmatch(buffer, line_end + 2, end + 2) is None:
        return None
    headers = _header_fields(buffer, line_end, end)
    if headers is None:
        return None
    length = headers.get(b"content-length")
    if length is None or DIGITS.fullmatch(length) is None:
        return None
    size = int(length)
    if size > max_body_bytes:
        return None  # aiohttp answers 413
    version = first[2]
    header = headers.get(HEADER_LENGTH_KEY)
    return Head(first[1].decode(), version.decode() if version is not None else None, headers, size,
                None if header is None else int(header) if DIGITS.fullmatch(header) else -1, end + 4)


def parse(buffer: bytes | bytearray, max_body_bytes: int, at: int = 0) -> tuple[LeanRequest, int] | int | None:
    """The request at offset ``at`` of ``buffer`` and the offset where it ends; while it
    is still arriving, MORE_HEAD or how many of its body bytes are here; None when it
    is not one the lean path answers (aiohttp then reads it from the same bytes)."""
    head = parse_head(buffer, max_body_bytes, at)
    if head is None or type(head) is int:
        return head
    start, size = head.start, head.size
    if len(buffer) < start + size:
        return len(buffer) - start
    return LeanRequest(head.model, head.version, head.headers, bytearray(memoryview(buffer)[start:start + size]),
                       head.header_length), start + size


class HeadCache:
    """:func:`parse` for one server, with the heads it read remembered: a client sends
    the same request line and header fields with each request (only the body
    changes), so such a head is read once. At most MAX_HEADS heads; when full, all
    are forgotten and read again."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        # head bytes -> (model, version, headers, body size, header length)
        self._heads: dict[bytes, tuple[str, str | None, Mapping[bytes, bytes], int, int | None]] = {}

    def parse(self, buffer: bytes | bytearray, at: int = 0) -> tuple[LeanRequest, int] | int | None:
        end = buffer.find(b"\r\n\r\n", at, at + MAX_HEAD_BYTES + 4)
        if end < 0:
            return parse(buffer, self.max_body_bytes, at)
        head = bytes(buffer[at:end])
        known = self._heads.get(head)
        if known is None:
            parsed = parse(buffer, self.max_body_bytes, at)
            if parsed is not None and type(parsed) is not int:
                request, stop = parsed
                if len(self._heads) >= MAX_HEADS:
                    self._heads.clear()
                self._heads[head] = (request.model, request.version, request.headers, stop - end - 4,
                                     request.header_length)
            return parsed
        model, version, headers, size, header_length = known
        start = end + 4
        if len(buffer) < start + size:
            return len(buffer) - start
        return LeanRequest(model, version, headers, bytearray(memoryview(buffer)[start:start + size]),
                           header_length), start + size

    def pending(self, buffer: bytes | bytearray, at: int = 0) -> Head | None:
        """The head of the request at ``at`` once it has all arrived (for a body still
        arriving), else None; the head is read afresh (once per request, not per read)."""
        head = parse_head(buffer, self.max_body_bytes, at)
        return None if head is None or type(head) is int else head


def frame(buffer: bytes | bytearray, at: int, max_body_bytes: int) -> int | None:
    """Where the request at offset ``at`` ends, when it is a plain HTTP/1.1 request
    (any method and target; no transfer coding, upgrade, Expect or Connection other
    than keep-alive; at most one Content-Length) that has all arrived; else None.
    aiohttp is given exactly such a request, so its parser is between requests after it."""
    end = buffer.find(b"\r\n\r\n", at, at + MAX_HEAD_BYTES + 4)
    if end < 0:
        return None
    line_end = buffer.find(b"\r\n", at, end + 2)
    if ANY_REQUEST_LINE.fullmatch(buffer, at, line_end) is None or HEADER_LINES.fullmatch(
            buffer, line_end + 2, end + 2) is None:
        return None
    headers = _header_fields(buffer, line_end, end)
    if headers is None:
        return None
    length = headers.get(b"content-length", b"0")
    if DIGITS.fullmatch(length) is None or int(length) > max_body_bytes:
        return None
    stop = end + 4 + int(length)
    return stop if stop <= len(buffer) else None


def _header_fields(buffer: bytes | bytearray, line_end: int, end: int) -> dict[bytes, bytes] | None:
    """The header fields between the request line (ending at ``line_end``) and the blank
    line (at ``end``): names lower case, values stripped. None when a name repeats, one
    changes how the request is framed (FRAMING), or Connection is other than keep-alive."""
    headers: dict[bytes, bytes] = {}
    if line_end < end:
        for line in buffer[line_end + 2:end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.lower()
            if name in headers or name in FRAMING:
                return None
            headers[name] = value.strip(b" \t")
    connection = headers.get(b"connection")
    if connection is not None and connection.lower() != b"keep-alive":
        return None
    return headers


def _may_become_lean(head: bytes) -> bool:
    """Whether the start of a head can still turn into a lean request."""
    if len(head) >= MAX_HEAD_BYTES or not REQUEST_START.startswith(head[:5]) or b"\n" in head.replace(b"\r\n", b""):
        return False
    line_end = head.find(b"\r\n")
    return line_end < 0 or REQUEST_LINE.fullmatch(head[:line_end]) is not None


class _Clock:
    """The Date header, formatted once a second as aiohttp does."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = formatdate(now, usegmt=True).encode()
        return self.value


_CLOCK = _Clock()
JSON_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n\r\n%s"
BINARY_ANSWER = (b"HTTP/1.1 200 OK\r\n" + HEADER_LENGTH.encode() + b": %d\r\nContent-Type: " + BINARY_TYPE.encode()
                 + b"\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n\r\n%s")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def render(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """Status line, ``headers`` in order, then Content-Length, Date and Server: what
    aiohttp writes for a ``web.Response`` with these headers on a keep-alive
    HTTP/1.1 connection."""
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b""))]
    head += [b"%s: %s" % (name.encode(), value.encode()) for name, value in headers]
    head += [b"Content-Length: %d" % len(body), b"Date: " + _CLOCK.date(), b"Server: " + SERVER, b"", b""]
    return b"\r\n".join(head) + body


def answer_bytes(payload: bytes, json_length: int | None) -> bytes:
    """The 200 answer ``HttpTransport.infer`` returns for an encoded response
    (what :func:`render` writes, in one step)."""
    if json_length is None:
        return JSON_ANSWER % (len(payload), _CLOCK.date(), SERVER, payload)
    return BINARY_ANSWER % (json_length, len(payload), _CLOCK.date(), SERVER, payload)


def error_bytes(exc: Exception) -> bytes:
    """The JSON error answer for ``exc``, as the aiohttp path's middleware makes it."""
    if isinstance(exc, EdgedError):
        answer = error_response(exc)
    else:
        log.error("unhandled error on POST infer (lean path)", exc_info=exc)
        answer = error_response(EdgedError("internal error; the daemon's log has the details"))
    return render(answer.status, list(answer.headers.items()), answer.body)
