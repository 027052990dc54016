"""The connection wrapper (edged.transports.http_conn, made by edged.http_limits.ConnectionGate) with a lean path: answers leave in
request order whether they are bytes at once, made in a coroutine, or aiohttp's.

The wrapped aiohttp protocol and the transport are small stand-ins that record what
they are given; the lean path's parser is the real one."""

from __future__ import annotations

import asyncio
from collections import deque

from edged.http_limits import ConnectionGate
from edged.transports.http_fast import frame, parse


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    abort = close


class Aiohttp:
    """What _Watched reads of aiohttp's RequestHandler; answers each request it is given
    with ``b"aiohttp:<bytes>"`` when ``answer()`` is called."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._keepalive_timeout = 30.0
        self._next_keepalive_close_time = 0.0
        self._messages: deque = deque()
        self._waiter = self._loop.create_future()  # idle: waiting for a request
        self.transport: Transport | None = None

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._messages.append(data)
        if not self._waiter.done():
            self._waiter.set_result(None)

    def answer(self) -> None:
        self.transport.write(b"aiohttp:" + self._messages.popleft())
        self._waiter = self._loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class Lean:
    """Answers ``/v2/models/now/infer`` at once and ``/v2/models/later/infer`` from a
    coroutine that waits for ``release``; other models go to aiohttp."""

    body_timeout = 30.0

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def parse(self, buffer: bytes, at: int):
        return parse(buffer, 1 << 16, at)

    def frame(self, buffer: bytes, at: int):
        return frame(buffer, at, 1 << 16)

    def __call__(self, request):
        if request.model == "now":
            return b"now:" + bytes(request.body)
        if request.model == "later":
            return self._later(bytes(request.body))
        return None

    async def _later(self, body: bytes) -> bytes:
        await self.release.wait()
        return b"later:" + body


def post(model: str, body: bytes) -> bytes:
    return b"POST /v2/models/%s/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (model.encode(), len(body), body)


async def _connection():
    lean, inner, transport = Lean(), None, Transport()

    def make() -> Aiohttp:
        nonlocal inner
        inner = Aiohttp()
        return inner

    gate = ConnectionGate(make, max_connections=10, header_timeout=30.0, lean=lean)
    watched = gate()
    watched.connection_made(transport)
    return watched, inner, lean, transport


def test_an_answer_made_in_a_coroutine_holds_the_next_requests_back():
    async def scenario():
        watched, inner, lean, transport = await _connection()
        watched.data_received(post("now", b"1") + post("later", b"2") + post("now", b"3"))
        assert transport.written == [b"now:1"] and not transport.reading
        watched.data_received(post("now", b"4"))  # read before the pause took effect: held
        lean.release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert transport.written == [b"now:1", b"later:2", b"now:3", b"now:4"] and transport.reading
        watched.connection_lost(None)

    asyncio.run(scenario())


def test_aiohttp_answers_its_request_in_turn_and_the_lean_path_goes_on():
    async def scenario():
        watched, inner, lean, transport = await _connection()
        other = b"GET /v2/health/live HTTP/1.1\r\n\r\n"
        watched.data_received(post("now", b"1") + other + post("now", b"2"))
        assert transport.written == [b"now:1"] and list(inner._messages) == [other] and not transport.reading
        await asyncio.sleep(0.01)
        assert transport.written == [b"now:1"]  # aiohttp has not answered: the next one waits
        inner.answer()
        await asyncio.sleep(0.05)
        assert transport.written == [b"now:1", b"aiohttp:" + other, b"now:2"] and transport.reading
        chunked = b"POST /v2/models/now/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
        watched.data_received(chunked + post("now", b"3"))  # from here on, all of it is aiohttp's
        assert list(inner._messages) == [chunked + post("now", b"3")]
        watched.data_received(post("now", b"4"))
        assert list(inner._messages)[-1] == post("now", b"4") and len(transport.written) == 3
        watched.connection_lost(None)

    asyncio.run(scenario())
