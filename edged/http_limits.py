"""Resource bounds of the HTTP server: connections, header time, bytes in flight,
memory given back, and log lines that cannot flood the journal.

Used by edged.transports.http; nothing here knows about routes or models. The
protocol of one connection that ``ConnectionGate`` makes is in edged.transports.http_conn.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from edged.errors import EdgedError, Overloaded
from edged.transports.http_conn import _Watched

if TYPE_CHECKING:
    from edged.transports.http_fast_infer import LeanInfer

log = logging.getLogger(__name__)

# Loggers whose warnings and errors are rate limited while the HTTP server runs:
# asyncio logs every failed accept() ("Too many open files") once per retry.
RATE_LIMITED_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "edged.transports.http", __name__)
FD_RESERVE = 128  # descriptors kept for models, files and the state database
TRIM_AFTER_BYTES = 1024 * 1024  # give memory back once requests this big are done


class RequestTimeout(EdgedError):
    """A request's body did not arrive in time (HTTP 408)."""

    code = "request_timeout"


class RateLimitFilter(logging.Filter):
    """The same warning or error at most once per ``interval`` seconds; the next one
    that passes says how many were suppressed."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg)[:200])
        now = self.clock()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        count = self._suppressed.pop(key, 0)
        if count:
            record.msg = f"{record.msg} ({count} more like this in the last {self.interval:g} s were not logged)"
        if len(self._last) > 1000:  # bounded: forget the oldest keys
            for old in sorted(self._last, key=self._last.get)[:500]:
                self._last.pop(old, None)
        return True

    def install(self) -> None:
        for name in RATE_LIMITED_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in RATE_LIMITED_LOGGERS:
            logging.getLogger(name).removeFilter(self)


def effective_max_connections(configured: int) -> int:
    """``configured``, lowered so open connections cannot use up RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    cap = max(16, soft - FD_RESERVE)
    if cap < configured:
        log.warning("http.max_connections %d lowered to %d: the open-file limit is %d "
                    "(raise it with LimitNOFILE= in the unit, or ulimit -n)", configured, cap, soft)
    return min(configured, cap)


class InflightBudget:
    """Bytes held by requests in flight, across all of them, with a ceiling.
    Thread-safe: decoding threads take their tensors' bytes as they go."""

    def __init__(self, limit: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.used = 0
        self.peak_since_trim = 0
        self.on_refused = on_refused
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Take ``nbytes`` or raise Overloaded (503) saying why."""
        with self._lock:
            if self.used + nbytes > self.limit:
                used = self.used
                refused = True
            else:
                self.used += nbytes
                self.peak_since_trim = max(self.peak_since_trim, self.used)
                refused = False
        if refused:
            self.on_refused()
            raise Overloaded(
                f"server busy: requests in flight hold {used} bytes and this one needs {nbytes} "
                f"more, over http.max_inflight_bytes ({self.limit}); retry shortly"
            )

    def release(self, nbytes: int) -> bool:
        """Give ``nbytes`` back; True when the server is idle after big requests
        (time to give memory back to the OS)."""
        with self._lock:
            self.used = max(0, self.used - nbytes)
            if self.used == 0 and self.peak_since_trim >= TRIM_AFTER_BYTES:
                self.peak_since_trim = 0
                return True
            return False

    def hold(self, nbytes: int) -> "Hold":
        self.reserve(nbytes)
        return Hold(self, nbytes)

    def try_hold(self, nbytes: int) -> "Hold | None":
        """A hold of ``nbytes``, or None (not counted as a refusal) when they are not there."""
        with self._lock:
            if self.used + nbytes > self.limit:
                return None
            self.used += nbytes
            self.peak_since_trim = max(self.peak_since_trim, self.used)
        return Hold(self, nbytes)


@dataclass
class Hold:
    """One request's share of the budget: its body, then its tensors as they are made."""

    budget: InflightBudget
    held: int = 0

    def take(self, nbytes: int) -> None:
        if nbytes > 0:
            self.budget.reserve(nbytes)
            self.held += nbytes

    def release(self) -> bool:
        held, self.held = self.held, 0
        return self.budget.release(held)


REFUSAL_BODY = (b'{"error":"server busy: too many open connections (http.max_connections); retry shortly",'
                b'"code":"overloaded"}')


class _Refusal(asyncio.Protocol):
    """Answers one 503 and closes: the connection limit is reached."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n" % len(REFUSAL_BODY))
        transport.write(head + REFUSAL_BODY)  # type: ignore[attr-defined]
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


class ConnectionGate:
    """The protocol factory given to ``loop.create_server``: at most ``max_connections``
    open at once (the next gets a 503 and is closed), each with a header timeout."""

    def __init__(self, make_protocol: Callable[[], Any], max_connections: int, header_timeout: float,
                 on_refused: Callable[[str], None] = lambda reason: None, lean: LeanInfer | None = None) -> None:
        self.make_protocol = make_protocol
        self.lean = lean  # reads and answers plain infer requests itself (edged.transports.http_fast)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.on_refused = on_refused
        self.live: weakref.WeakSet[_Watched] = weakref.WeakSet()  # a failed TLS handshake just drops out
        # aiohttp protocol -> its lean connection, while aiohttp answers a request handed to it
        # (the HTTP middleware tells the connection when that request's task is done).
        self.handed: dict[Any, _Watched] = {}
        self.refused = 0
        self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        if len(self.live) >= self.max_connections:
            self.refused += 1
            self.on_refused("connections")
            log.warning("HTTP connection refused: %d connections open (http.max_connections)", len(self.live))
            return _Refusal()
        watched = _Watched(self.make_protocol(), self)
        self.live.add(watched)
        return watched
