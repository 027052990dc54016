"""``LeanInfer``: the infer handler of the lean HTTP path (``edged.transports.http_fast``),
the steps of ``HttpTransport.infer`` for a request read from the connection
(``edged.transports.http_conn._Watched``), answered as bytes or by a coroutine.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable

from edged.auth import Access, check_access
from edged.dataplane import InferenceResponse
from edged.errors import EdgedError
from edged.http_limits import RequestTimeout
from edged.transports.http import OFFLOAD_BYTES
from edged.transports.http_fast import Head, HeadCache, LeanRequest, answer_bytes, error_bytes, frame
from edged.v2 import DecodedRequest, decode_request, response_bytes
from edged.v2_binary import BinaryLayouts, BinaryResponses


if TYPE_CHECKING:
    from edged.http_limits import Hold
    from edged.model_entry import ModelEntry
    from edged.transports.http import HttpTransport


class LoopAnswer(asyncio.Future):
    """The answer (bytes) of a request batched on the loop, set on the loop when its
    batch has run; the connection awaits it as it awaits any later answer."""


class LeanInfer:
    """The lean path's infer handler: the steps of ``HttpTransport.infer``, answered as
    bytes, or by a coroutine when the model runs in a worker thread or the batcher, the
    body is too big to decode on the loop, or the response too big to encode on it.
    None hands the request to aiohttp (only before anything is counted or run, so
    aiohttp starts it afresh)."""

    def __init__(self, http: "HttpTransport") -> None:
        self.http = http
        self.heads = HeadCache(http.max_body_bytes)
        self.parse = self.heads.parse  # (buffer, at) -> as parse()
        self.layouts = BinaryLayouts()
        self.responses = BinaryResponses()

    def frame(self, buffer: bytes | bytearray, at: int) -> int | None:
        return frame(buffer, at, self.http.max_body_bytes)

    @property
    def body_timeout(self) -> float:
        return self.http.settings.body_timeout_s

    def body_late(self, arrived: int) -> bytes:
        """The 408 answer of the aiohttp path when a body stops coming (the connection then closes)."""
        timeout = self.body_timeout
        self.http.m_refused.labels("body_timeout").inc()
        return error_bytes(RequestTimeout(f"no request body bytes for {timeout:g} s (http.body_timeout_s); "
                                          f"{arrived} bytes arrived"))

    def pending(self, buffer: bytes | bytearray, at: int) -> Head | None:
        """The head of the request at ``at`` when its body, still arriving, is big
        (over OFFLOAD_BYTES): such a body is read straight into one buffer
        (``edged.transports.http_body.BodyReader``) once :meth:`admit` lets it in."""
        head = self.heads.pending(buffer, at)
        return head if head is not None and head.size > OFFLOAD_BYTES else None

    def _checked(self, request: LeanRequest | Head) -> ModelEntry | None:
        """The token, the model and the header length field, as the aiohttp path checks
        them; None when aiohttp should answer (it counts and logs the refusal)."""
        http = self.http
        if http.tokens is not None:
            authorization = request.headers.get(b"authorization")
            try:
                check_access(http.tokens, Access.INFER, authorization.decode() if authorization is not None else None)
            except EdgedError:
                return None  # aiohttp answers the refusal, counts and logs it
        try:
            entry = http.dataplane.check_model(request.model, request.version)
        except EdgedError:
            return None  # aiohttp answers it (nothing was counted)
        header_length = request.header_length
        if header_length is not None and header_length < 0:
            return None  # aiohttp names what is wrong with it
        return entry

    def admit(self, head: Head) -> tuple[ModelEntry, Hold] | None:
        """Before a big body is read: the checks, and its bytes reserved in the in-flight
        budget; None leaves the request to aiohttp (which answers a refusal, 503 when the
        budget is short, and reads or drops the body)."""
        entry = self._checked(head)
        if entry is None:
            return None
        hold = self.http.budget.try_hold(head.size)
        return None if hold is None else (entry, hold)

    def __call__(self, request: LeanRequest) -> bytes | None | Awaitable[bytes]:
        http = self.http
        entry = self._checked(request)
        if entry is None:
            return None
        body = request.body
        max_body = http.max_body_bytes
        try:
            hold = http.budget.hold(min(len(body) or max_body, max_body))
        except EdgedError as exc:
            return error_bytes(exc)
        if len(body) > OFFLOAD_BYTES:
            return self.big(request, entry, hold)
        try:
            header_length = request.header_length
            decoded = None if header_length is None else self.layouts.decode(
                request.model, request.version, body, header_length)
            if decoded is None:
                decoded = decode_request(request.model, request.version, body, header_length, hold.take)
                if header_length is not None:
                    self.layouts.learn(body, header_length, decoded)
        except Exception as exc:
            if hold.release():
                http._trim_soon()
            return error_bytes(exc)
        del body
        return self._run(hold, entry, decoded)

    def _run(self, hold: Hold, entry: ModelEntry, decoded: DecodedRequest) -> bytes | Awaitable[bytes]:
        """A decoded request: run on the loop and answered as bytes, or by ``_later``;
        ``hold`` is released once it is answered."""
        http = self.http
        dataplane = http.dataplane
        later = None
        try:
            http._lean_inc(1)
            if not dataplane.runs_inline(decoded.request, http.inline_max_us, entry):
                later = self._batched(hold, entry, decoded) if entry.batcher is not None else None
                if later is None:
                    later = self._later(hold, entry, decoded, None)
                return later
            http._inline_inc(1)
            response = dataplane.infer(decoded.request, "http", entry)
            size = 0  # response_bytes(response)
            for array in response.outputs.values():
                size += array.nbytes
            hold.take(size * 4)  # JSON text of numbers takes up to ~4x their binary size
            if size > OFFLOAD_BYTES:
                later = self._later(hold, entry, decoded, response)
                return later
            return answer_bytes(*self.responses.encode(response, decoded.binary_outputs, decoded.all_binary))
        except Exception as exc:
            return error_bytes(exc)
        finally:
            if later is None and hold.release():
                http._trim_soon()

    def _batched(self, hold: Hold, entry: ModelEntry, decoded: DecodedRequest) -> bytes | LoopAnswer | None:
        """A small request to a cheap batched model, batched and run on the loop
        (``DataPlane.infer_on_loop``): its answer, or a future of it, set when its batch
        has run; ``hold`` is released then. None when it is not for the loop."""
        batcher = entry.batcher
        if batcher is None:  # a reload after the caller looked
            return None
        answer = LoopAnswer()

        def reply(outcome: InferenceResponse | EdgedError) -> None:
            if isinstance(outcome, InferenceResponse):
                size = 0
                for array in outcome.outputs.values():
                    size += array.nbytes
                hold.take(size * 4)
                if size > OFFLOAD_BYTES:  # encoded off the loop by _later, which releases ``hold``
                    later = asyncio.ensure_future(self._later(hold, entry, decoded, outcome))
                    later.add_done_callback(lambda task: settle(task.result()))
                    return
                try:
                    payload = answer_bytes(*self.responses.encode(outcome, decoded.binary_outputs, decoded.all_binary))
                except Exception as exc:
                    payload = error_bytes(exc)
            else:
                payload = error_bytes(outcome)
            if hold.release():
                self.http._trim_soon()
            settle(payload)

        def settle(payload: bytes) -> None:
            if not answer.done():  # done: cancelled with its connection
                answer.set_result(payload)

        if not self.http.dataplane.infer_on_loop(decoded.request, "http", entry, self.http.inline_max_us, reply):
            return None
        return answer.result() if answer.done() else answer  # done: its joining made the batch go

    def body_here(self, head: Head, body: bytearray, entry: ModelEntry, hold: Hold) -> Awaitable[bytes]:
        """The answer to an admitted request whose big body has been read (``admit``)."""
        return self.big(LeanRequest(head.model, head.version, head.headers, body, head.header_length), entry, hold)

    async def big(self, request: LeanRequest, entry: ModelEntry, hold: Hold) -> bytes:
        """A request with a big body (``hold`` has its bytes): decoded in a worker thread
        one at a time (``HttpTransport._codec``) as on the aiohttp path; a binary body
        whose JSON header was seen before is only viewed, on the loop."""
        http = self.http
        try:
            body, request.body = request.body, bytearray()
            header_length = request.header_length
            decoded = None if header_length is None else self.layouts.decode(
                request.model, request.version, body, header_length)
            if decoded is None:
                decoded = await http._codec("decode", len(body), decode_request, request.model, request.version, body,
                                            header_length, hold.take)
                if header_length is not None:
                    self.layouts.learn(body, header_length, decoded)
            del body
        except Exception as exc:
            if hold.release():
                http._trim_soon()
            return error_bytes(exc)
        answer = self._run(hold, entry, decoded)
        return answer if isinstance(answer, bytes) else await answer

    async def _later(self, hold: Hold, entry: ModelEntry, decoded: DecodedRequest,
                     response: InferenceResponse | None) -> bytes:
        """The rest of ``HttpTransport.infer`` off the loop: the model call in a worker
        thread or the batcher (unless ``response`` is here), a big response encoded in a
        worker thread."""
        http = self.http
        dataplane = http.dataplane
        try:
            if response is None:
                if entry.batcher is not None:  # batched on the loop when small and cheap (inline_max_us)
                    response = await dataplane.infer_batched(decoded.request, "http", entry, http.inline_max_us)
                else:
                    response = await http._offload(dataplane.infer, decoded.request, "http", entry)
                size = response_bytes(response)
                hold.take(size * 4)
            else:
                size = response_bytes(response)
            if size <= OFFLOAD_BYTES:
                return answer_bytes(*self.responses.encode(response, decoded.binary_outputs, decoded.all_binary))
            encoded = await http._codec("encode", size, self.responses.encode, response, decoded.binary_outputs,
                                        decoded.all_binary)
            return answer_bytes(*encoded)
        except Exception as exc:
            return error_bytes(exc)
        finally:
            if hold.release():
                http._trim_soon()
