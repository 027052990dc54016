"""The HTTP server's protocol for one connection (``_Watched``): the header timeout, and
the lean path's reading of requests, its answers in request order and its hand-overs
to aiohttp.

Made by ``edged.http_limits.ConnectionGate``; a big body is read by
``edged.transports.http_body.BodyReader`` in its place.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable

from edged.transports.http_body import BodyReader

if TYPE_CHECKING:
    from edged.http_limits import ConnectionGate, Hold
    from edged.model_entry import ModelEntry
    from edged.transports.http_fast import Head

HOLD_BYTES = 1024 * 1024  # bytes a lean connection holds while aiohttp answers; beyond, aiohttp keeps it
IDLE_POLL_S = 0.005  # whether aiohttp has answered a request handed to it, when no handler said so
IDLE_POLL_MAX_S = 0.05


class _Watched(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: counts it, and closes it when its
    first request's headers do not arrive within ``header_timeout`` seconds.

    With the gate's ``lean`` path (``edged.transports.http_fast``), the requests it
    reads are answered here (a big body is read by a ``BodyReader`` in its place).
    Another plain request is handed to aiohttp on its own, and the lean path goes on
    once aiohttp has answered it; anything else (a body still streaming in that the
    lean path does not take, chunked, an upgrade...) and all bytes after it go to aiohttp,
    which keeps the connection from then on. Answers leave in request order."""

    def __init__(self, inner: Any, gate: "ConnectionGate") -> None:
        self.inner = inner
        self.gate = gate
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self._lean = gate.lean
        self._held = b""  # bytes read while an answer is being made (or a request is still arriving)
        self._busy: str | None = None  # "lean": a lean answer is made in a coroutine; "aiohttp": aiohttp answers one
        self._paused = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._finishing: asyncio.Future[None] | None = None
        self._busy_timer: asyncio.TimerHandle | None = None  # while a lean answer is being made
        self._handoffs = 0  # requests handed to aiohttp one by one so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self.gate.header_timeout, self._headers_late)
        self.inner.connection_made(transport)
        # The lean path keeps aiohttp's idle timer (http.idle_timeout_s) going and waits for
        # aiohttp to be idle; where this aiohttp has neither, no lean path.
        inner = self.inner
        if self._lean is not None and not (getattr(inner, "_keepalive_timeout", 0) > 0 and all(
                hasattr(inner, name) for name in ("_loop", "_next_keepalive_close_time", "_waiter", "_messages"))):
            self._lean = None

    def _headers_late(self) -> None:
        self._timer = None
        self.gate.timed_out += 1
        self.gate.on_refused("header_timeout")
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seam = self._tail + data[:3]  # a blank line split across two reads
            if any(end in part for part in (data, seam) for end in (b"\r\n\r\n", b"\n\n")):
                self._timer.cancel()
                self._timer = None
            self._tail = (self._tail + data)[-3:]
        if self._lean is None:
            self.inner.data_received(data)
        elif self._busy is not None:
            self._held += data
            if self._busy == "aiohttp" and len(self._held) > HOLD_BYTES:  # aiohttp keeps it all from here
                held, self._held, self._busy, self._lean = self._held, b"", None, None
                if not self._paused and self._transport is not None:
                    self._transport.resume_reading()  # type: ignore[attr-defined]
                self.inner.data_received(held)
        else:
            if self._held:
                data, self._held = self._held + data, b""
            self._serve(data)

    def _serve(self, data: bytes) -> None:
        """Answer the lean requests in ``data``, in order; hand aiohttp the others."""
        lean, transport, inner = self._lean, self._transport, self.inner
        at, size = 0, len(data)
        answered = False  # an answer went out: aiohttp's idle timer counts from now (once per read)
        while at < size and transport is not None:
            parsed = lean.parse(data, at)  # offsets, not slices: no copy of the rest per request
            if type(parsed) is int:  # a lean request still arriving
                head = lean.pending(data, at) if parsed >= 0 else None
                if head is None:  # a small body (or the head) still arriving: wait for it here
                    self._held = data[at:]
                    self._body_wait(parsed)
                    return
                admitted = lean.admit(head)
                if admitted is None:
                    break  # aiohttp answers (and reads the body)
                if answered:
                    self._kept_alive()
                self._read_body(head, *admitted, data)
                return
            answer = lean(parsed[0]) if parsed is not None else None
            if answer is None:
                stop = lean.frame(data, at)
                if stop is None:
                    break
                # aiohttp answers this one request; the lean path goes on when aiohttp is idle
                # again: its handler's task says when it is done (``answered``), else a slow poll.
                if answered:
                    self._kept_alive()
                self._wait("aiohttp", data[stop:])
                self.gate.handed[inner] = self
                inner.data_received(data[at:stop])
                self._handoffs += 1
                asyncio.get_running_loop().call_later(IDLE_POLL_S, self._aiohttp_idle, IDLE_POLL_S, self._handoffs)
                return
            at = parsed[1]
            if isinstance(answer, bytes):
                transport.write(answer)  # type: ignore[attr-defined]
                answered = True
                continue
            self._kept_alive()
            self._wait("lean", data[at:])
            self._finishing = asyncio.ensure_future(self._finish(answer))
            return
        else:
            if answered:
                self._kept_alive()
            if self._body_timer is not None:
                self._body_wait(None)
            return
        if answered:
            self._kept_alive()
        self._body_wait(None)
        self._lean = None
        inner.data_received(data[at:] if at else data)

    def _read_body(self, head: Head, entry: ModelEntry, hold: Hold, data: bytes) -> None:
        """Read the rest of a big body straight into one buffer of its size (``BodyReader``)."""
        self._body_wait(None)
        body = bytearray(head.size)
        got = len(data) - head.start
        body[:got] = memoryview(data)[head.start:]
        self._transport.set_protocol(BodyReader(self, head, hold, entry, body, got))  # type: ignore[union-attr]

    def _body_here(self, reader: BodyReader) -> None:
        """A big body has all arrived: this is the protocol again; it is answered by a
        coroutine, and the connection reads on once that answer is sent."""
        transport = self._transport
        if transport is None:
            return
        transport.set_protocol(self)
        hold, body = reader.hold, reader.body
        reader.hold, reader.body = None, bytearray()
        self._kept_alive()  # aiohttp's idle timer: the request is in progress from now
        self._wait("lean", b"")
        answer = self._lean.body_here(reader.head, body, reader.entry, hold)  # type: ignore[union-attr, arg-type]
        self._finishing = asyncio.ensure_future(self._finish(answer))

    def _wait(self, busy: str, held: bytes) -> None:
        """Read no more requests until the one in hand is answered (``_done``)."""
        self._busy = busy
        self._held = held
        self._body_wait(None)
        self._transport.pause_reading()  # type: ignore[union-attr]

    def _done(self) -> None:
        self._busy = None
        self._finishing = None
        transport = self._transport
        if transport is None:
            return
        if not self._paused:
            transport.resume_reading()  # type: ignore[attr-defined]
        held, self._held = self._held, b""
        if held:
            self._serve(held)

    def answered(self, _task: Any = None) -> None:
        """aiohttp's task for the request handed to it is done (its answer is written):
        aiohttp is idle now or at its next step."""
        self._aiohttp_idle(0.0, self._handoffs)

    def _aiohttp_idle(self, delay: float, handoff: int) -> None:
        """Back to the lean path once aiohttp has answered and waits for the next
        request; else checked again after ``delay`` seconds (the next loop step for 0),
        then less and less often. ``handoff`` is the hand-over this check is for."""
        if self._busy != "aiohttp" or self._transport is None or handoff != self._handoffs:
            return
        inner = self.inner
        waiter = inner._waiter
        if waiter is not None and not waiter.done() and not inner._messages:
            self.gate.handed.pop(inner, None)
            self._done()
        elif delay <= 0:
            asyncio.get_running_loop().call_soon(self._aiohttp_idle, IDLE_POLL_S, handoff)
        else:
            asyncio.get_running_loop().call_later(delay, self._aiohttp_idle, min(2 * delay, IDLE_POLL_MAX_S), handoff)

    def _body_wait(self, arrived: int | None) -> None:
        """While a lean request's body is arriving (``arrived`` bytes of it so far), each
        piece must come within http.body_timeout_s, as on the aiohttp path."""
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if arrived is not None and arrived >= 0:
            timeout = self._lean.body_timeout
            self._body_timer = asyncio.get_running_loop().call_later(timeout, self._body_late, arrived)
            inner = self.inner  # a request is in progress: aiohttp's idle timer must not close the connection first
            inner._next_keepalive_close_time = inner._loop.time() + timeout + inner._keepalive_timeout

    def _body_late(self, arrived: int) -> None:
        self._body_timer = None
        if self._transport is not None and self._lean is not None:
            self._transport.write(self._lean.body_late(arrived))  # type: ignore[attr-defined]
            self._transport.close()

    async def _finish(self, answer: Awaitable[bytes]) -> None:
        """Send an answer made in a coroutine, then go on with what came meanwhile.
        Until it is sent the connection is busy, not idle: aiohttp's idle timer, which
        sees no request of its own, is pushed on (a batch that waits or a slow model
        took longer than http.idle_timeout_s, and aiohttp closed the connection)."""
        self._keep_open()
        try:
            payload = await answer
        finally:
            if self._busy_timer is not None:
                self._busy_timer.cancel()
                self._busy_timer = None
        transport = self._transport
        if transport is None:
            return
        transport.write(payload)  # type: ignore[attr-defined]
        self._kept_alive()
        self._done()

    def _keep_open(self) -> None:
        """aiohttp's idle close time pushed on now and every half idle timeout after."""
        self._kept_alive()
        inner = self.inner
        self._busy_timer = inner._loop.call_later(inner._keepalive_timeout / 2, self._keep_open)

    def _kept_alive(self) -> None:
        """An answer went out: aiohttp's idle timer counts from now (it reschedules itself)."""
        inner = self.inner
        inner._next_keepalive_close_time = inner._loop.time() + inner._keepalive_timeout

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        if self._lean is not None and self._transport is not None and not self._paused:
            self._paused = True  # the client does not read its answers: read no more requests
            self._transport.pause_reading()  # type: ignore[attr-defined]
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            if self._busy is None:
                self._transport.resume_reading()  # type: ignore[attr-defined]
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._body_wait(None)
        self.gate.live.discard(self)
        self.gate.handed.pop(self.inner, None)
        self._transport = None
        self.inner.connection_lost(exc)
