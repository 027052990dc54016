"""Reading big request bodies and giving their memory back: helpers of the HTTP transport."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from edged.http_limits import Hold
    from edged.model_entry import ModelEntry
    from edged.transports.http_conn import _Watched
    from edged.transports.http_fast import Head

READ_BYTES = 4 << 20  # socket reads for a big body: up to this much at once


def find_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` from the process's own symbols (no ``find_library``:
    that runs ``ldconfig`` in a subprocess, 1.5 to 4 ms), or False (musl)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(trim_bytes: int = 256 << 20, mmap_bytes: int = 64 << 20) -> bool:
    """glibc: blocks freed by big requests (bodies, their tensors) stay in the heap
    while requests come, instead of going back to the OS after each one (a 3 MB JSON
    body took ~800 page faults a request, ~1 ms of its ~10 ms CPU); the idle
    ``malloc_trim`` hands them back. Both settings are needed: setting one freezes
    glibc's adaptive value of the other. False where there is no ``mallopt`` (musl)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, trim_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes))


@contextmanager
def big_reads(transport: Any, length: int | None) -> Iterator[None]:
    """Socket reads of up to READ_BYTES while a big body arrives. asyncio reads at
    most 256 KiB a loop turn, so a 3 MB body took a dozen turns, each waiting for the
    GIL while a thread decoded another body (8 clients with 3 MB JSON bodies: 5 to
    50% more requests per second, interleaved). Only for this body: the transport's
    own size comes back after it; transports without ``max_size`` (uvloop, TLS) are
    left as they are."""
    size = min(length or 0, READ_BYTES)
    if size <= getattr(transport, "max_size", size):
        yield
        return
    transport.max_size = size
    try:
        yield
    finally:
        del transport.max_size  # the class's own value again


class BodyReader(asyncio.BufferedProtocol):
    """The connection's protocol while a big lean request's body arrives: the socket
    reads straight into one buffer of the body's size (``recv_into``; no bytes object
    per read, no joining), so nothing past the body is read. Each read must come
    within http.body_timeout_s (408, then the connection closes). Everything else goes
    to the connection's ``_Watched``, which is the protocol again once the body is here."""

    def __init__(self, watched: _Watched, head: Head, hold: Hold, entry: ModelEntry, body: bytearray,
                 filled: int) -> None:
        self.watched = watched
        self.head = head
        self.hold: Hold | None = hold
        self.entry = entry
        self.body = body
        self.filled = filled
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()  # when the last bytes came
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.last)

    def _arm(self, now: float) -> None:
        """The body timer, once per timeout (not per read): when it fires it looks at ``last``."""
        watched = self.watched
        timeout = watched._lean.body_timeout
        self._timer = self._loop.call_at(self.last + timeout, self._check)
        inner = watched.inner  # a request is in progress: aiohttp's idle timer must not close the connection
        inner._next_keepalive_close_time = now + timeout + inner._keepalive_timeout

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if now - self.last < self.watched._lean.body_timeout:
            self._arm(now)
            return
        self.watched._body_late(self.filled)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.body)[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        self.last = self._loop.time()
        if self.filled >= len(self.body):
            self._stop()
            self.watched._body_here(self)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        return self.watched.eof_received()

    def pause_writing(self) -> None:
        self.watched.pause_writing()

    def resume_writing(self) -> None:
        self.watched.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.release()
        self.body = bytearray()
        self.watched.connection_lost(exc)
