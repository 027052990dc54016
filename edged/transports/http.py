"""KServe V2 REST over aiohttp, compatible with tritonclient.http.

Routes follow Triton's HTTP API. Inference runs in a thread pool so the event
loop never blocks on a model.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from aiohttp import web

from edged.auth import Access, TokenStore, check_access, tls_context
from edged.config import HttpConfig
from edged.dataplane import DataPlane
from edged.errors import EdgedError, InvalidInput, PayloadTooLarge
from edged.http_limits import (
    ConnectionGate, InflightBudget, RateLimitFilter, RequestTimeout, effective_max_connections,
)
from edged.metrics import fast_inc
from edged.transports.http_body import big_reads, find_malloc_trim
from edged.transports.http_routes import ControlRoutes, json_response
from edged.v2 import HEADER_LENGTH, decode_request, encode_response, response_bytes

log = logging.getLogger(__name__)

# The one place error codes become HTTP statuses.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 400,
    "bundle_invalid": 400,
    "signature_invalid": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "request_timeout": 408,
    "update_refused": 409,
    "update_failed": 502,
    "model_not_found": 404,
    "payload_too_large": 413,
    "model_not_ready": 503,
    "overloaded": 503,
    "runtime_unavailable": 503,
    "inference_failed": 500,
    "config_invalid": 500,
    "internal": 500,
}
BINARY_TYPE = "application/octet-stream"
OFFLOAD_BYTES = 64 * 1024  # bodies and responses bigger than this are decoded/encoded in a worker thread
TRIM_DELAY_S = 0.2  # freed memory goes back to the OS this long after big requests, when idle

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: EdgedError) -> web.Response:
    status = STATUS_BY_CODE.get(exc.code, 500)
    headers = {"WWW-Authenticate": 'Bearer realm="edged"'} if status == 401 else None
    return json_response({"error": exc.message, "code": exc.code}, status, headers)


def _error_of(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer for an exception a handler raised (never its internals)."""
    if isinstance(exc, EdgedError):
        return error_response(exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(PayloadTooLarge(f"request body is over the limit: {exc.text}"))
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return json_response({"error": exc.reason, "code": "http"}, exc.status)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return json_response({"error": "internal error; the daemon's log has the details", "code": "internal"}, 500)


class HttpTransport(ControlRoutes):
    """The aiohttp application and server for one data plane (its health, metadata,
    repository and OTA handlers come from ``ControlRoutes``)."""

    def __init__(self, dataplane: DataPlane, host: str, port: int, max_body_bytes: int, workers: int = 8,
                 inline_max_us: float = 0.0, settings: HttpConfig | None = None) -> None:
        self.dataplane = dataplane
        self._inline_max_us = inline_max_us
        config = getattr(dataplane, "config", None)
        self.settings = settings or (config.http if config is not None else HttpConfig())
        self._resolve = config.resolve if config is not None else (lambda path: path)
        from prometheus_client import Counter, Gauge

        registry = dataplane.metrics.registry
        self.m_inline = Counter("edged_http_inline_requests", "HTTP inferences run on the event loop (no thread hop).",
                                registry=registry)
        self._inline_inc = fast_inc(self.m_inline)
        self.m_lean = Counter("edged_http_lean_requests", "HTTP inferences read and answered by edged's lean path "
                              "(edged.transports.http_fast), not by aiohttp.", registry=registry)
        self._lean_inc = fast_inc(self.m_lean)
        self.m_refused = Counter("edged_http_refused", "HTTP requests or connections refused, by reason.",
                                 ["reason"], registry=registry)
        self.m_offloaded = Counter("edged_http_offloaded", "Bodies decoded or responses encoded in a worker thread.",
                                   ["what"], registry=registry)
        self.m_codec_busy = Gauge("edged_http_codec_in_progress", "Bodies being decoded or encoded in worker threads now.",
                                  registry=registry)
        self.m_inflight = Gauge("edged_http_inflight_bytes", "Bytes held by HTTP requests in flight (bodies, tensors, responses).",
                                registry=registry)
        self.m_inflight.set_function(lambda: self.budget.used)  # read at scrape time, not set per request
        self.m_connections = Gauge("edged_http_open_connections", "Open HTTP connections (TLS handshakes included).",
                                   registry=registry)
        self.m_connections.set_function(lambda: len(self.gate.live) if self.gate else 0)
        self.m_trims = Counter("edged_http_memory_trims", "Times freed memory was handed back to the OS after big requests.",
                               registry=registry)
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edged-infer")
        self.budget = InflightBudget(max(self.settings.max_inflight_bytes, 2 * max_body_bytes),
                                     on_refused=lambda: self.m_refused.labels("inflight_bytes").inc())
        self.tokens: TokenStore | None = None
        self.gate: ConnectionGate | None = None
        self._log_filter = RateLimitFilter()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._access: dict[Any, Access] = {}
        self._trim_timer: asyncio.TimerHandle | None = None
        self._codec_turn = asyncio.Semaphore(1)  # big bodies decoded / responses encoded one at a time
        self._malloc_trim: Any = None  # glibc's malloc_trim, found on first use; False where there is none
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._guard])
        health = Access.PUBLIC if self.settings.public_health else Access.ANY_TOKEN

        def add(method: str, path: str, handler: Handler, access: Access) -> None:
            self._access[app.router.add_route(method, path, handler)] = access

        add("GET", "/v2", self.server_metadata, health)
        add("GET", "/v2/health/live", self.live, health)
        add("GET", "/v2/health/ready", self.ready, health)
        add("POST", "/v2/repository/index", self.repository_index, Access.ADMIN)
        add("POST", "/v2/repository/models/{model}/load", self.load, Access.ADMIN)
        add("POST", "/v2/repository/models/{model}/unload", self.unload, Access.ADMIN)
        add("POST", "/v2/repository/models/{model}/rollback", self.rollback, Access.ADMIN)
        add("GET", "/v2/ota/status", self.ota_status, Access.ADMIN)
        add("POST", "/v2/ota/update", self.ota_update, Access.ADMIN)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add("GET", prefix, self.model_metadata, health)
            add("GET", prefix + "/ready", self.model_ready, health)
            add("GET", prefix + "/config", self.model_config, health)
            add("POST", prefix + "/infer", self.infer, Access.INFER)
        add("GET", "/metrics", self.metrics, health)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The one middleware (each layer costs every request): checks the bearer token
        before a byte of the body is read, and turns errors into JSON answers."""
        gate = self.gate
        if gate is not None and gate.handed:  # a lean connection waits for this request's answer
            lean = gate.handed.pop(request.protocol, None)
            task = asyncio.current_task()
            if lean is not None and task is not None:
                task.add_done_callback(lean.answered)
        try:
            if self.tokens is not None:
                self._authorize(request)
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error_of(request, exc)
        except Exception as exc:  # never let a request take the daemon down, nor show its internals
            return _error_of(request, exc)

    def _authorize(self, request: web.Request) -> None:
        access = self._access.get(request.match_info.route, Access.ANY_TOKEN)
        try:
            check_access(self.tokens, access, request.headers.get("Authorization"))
        except EdgedError as exc:
            self.m_refused.labels(exc.code).inc()
            log.warning("HTTP %s %s refused: %s", request.method, request.path, exc.message)
            raise

    @property
    def inline_max_us(self) -> float:
        """``http.inline_max_us``; 0 (never on the loop) while each result is written to disk
        before its answer (``mqtt.publish_http_results``: an outbox commit with its fsync)."""
        return 0.0 if self.dataplane.result_listeners else self._inline_max_us

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> None:
        settings = self.settings
        if settings.tokens_file:
            self.tokens = TokenStore.load(self._resolve(settings.tokens_file))
        context = None
        if settings.tls_cert_file:
            context = tls_context(str(self._resolve(settings.tls_cert_file)), str(self._resolve(settings.tls_key_file)),
                                  str(self._resolve(settings.tls_client_ca_file)) if settings.tls_client_ca_file else "")
        self._log_filter.install()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=settings.idle_timeout_s)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None  # setup() made it
        from edged.transports.http_fast_infer import LeanInfer

        self.gate = ConnectionGate(server, effective_max_connections(settings.max_connections), settings.header_timeout_s,
                                   on_refused=lambda reason: self.m_refused.labels(reason).inc(), lean=LeanInfer(self))
        self._server = await asyncio.get_running_loop().create_server(
            self.gate, self.host, self.port, ssl=context, reuse_address=True, backlog=128,
            ssl_handshake_timeout=settings.header_timeout_s if context else None,
        )
        if self.port == 0 and self._server.sockets:  # report the port the OS picked
            self.port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if context else "http"
        access = f"tokens from {settings.tokens_file}" if self.tokens else "open (no http.tokens_file)"
        mtls = ", client certificates required" if settings.tls_client_ca_file else ""
        log.info("HTTP listening on %s://%s:%d; access: %s%s", scheme, self.host, self.port, access, mtls)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self._log_filter.remove()
        self.executor.shutdown(wait=True, cancel_futures=False)

    async def _offload(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    async def _codec(self, what: str, size: int, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` on the loop when ``size`` is small, else in a worker thread,
        one at a time (``_codec_turn``): decoding and encoding JSON hold the GIL, so
        several at once only take turns with each other and with the loop (8 clients
        with 3 MB bodies: ~25% more requests per second one at a time), and each
        holds the Python numbers of its piece."""
        if size <= OFFLOAD_BYTES:
            return func(*args)
        async with self._codec_turn:
            self.m_offloaded.labels(what).inc()
            self.m_codec_busy.inc()
            try:
                return await self._offload(func, *args)
            finally:
                self.m_codec_busy.dec()

    # -- inference --------------------------------------------------------
    def _body_now(self, request: web.Request) -> bytearray | None:
        """The whole body when it has all arrived already (no wait, so no timer), else
        None; PayloadTooLarge when it is over http.max_body_bytes."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(
                f"request body is {length} bytes; the limit is {self.max_body_bytes} (http.max_body_bytes)"
            )
        content = request.content
        if not content.is_eof():
            return None
        body = bytearray(content.read_nowait())
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes (http.max_body_bytes)")
        return body

    async def _read(self, request: web.Request) -> bytearray:
        """The whole body, read chunk by chunk: each chunk must come within
        http.body_timeout_s, and the total within http.max_body_bytes."""
        body = self._body_now(request)
        if body is not None:
            return body
        content = request.content
        body = bytearray()
        timeout = self.settings.body_timeout_s
        with big_reads(request.transport, request.content_length):
            return await self._read_chunks(content, body, timeout)

    async def _read_chunks(self, content: Any, body: bytearray, timeout: float) -> bytearray:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
            except TimeoutError:
                self.m_refused.labels("body_timeout").inc()
                raise RequestTimeout(f"no request body bytes for {timeout:g} s (http.body_timeout_s); "
                                     f"{len(body)} bytes arrived") from None
            if not chunk:
                return body
            if len(body) + len(chunk) > self.max_body_bytes:
                raise PayloadTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes (http.max_body_bytes)")
            body += chunk

    def _trim_soon(self) -> None:
        """On the loop, when the last big request is done: hand freed memory back to
        the OS TRIM_DELAY_S later, once, if the server is idle then (else later again).
        Not after every request: under load that was a trim (and, before, a
        subprocess looking for libc) per request, and the pages came straight back."""
        if self._trim_timer is None:
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim_due)

    def _trim_due(self) -> None:
        self._trim_timer = None
        if self.budget.used:  # busy again: try again when this burst may be over
            self._trim_soon()
            return
        try:
            asyncio.get_running_loop().run_in_executor(self.executor, self._trim)
        except RuntimeError:  # the executor was shut down: the server is stopping
            pass

    def _trim(self) -> None:
        if self._malloc_trim is None:
            self._malloc_trim = find_malloc_trim()
        if self._malloc_trim is not False and self._malloc_trim(0):
            self.m_trims.inc()

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """The hot path: one model lookup, the body read at once when it has all
        arrived, small bodies decoded and fast models run on the loop."""
        info = request.match_info
        entry = self.dataplane.check_model(info["model"], info.get("version"))
        header = request.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
        # The request's share of http.max_inflight_bytes: its body first, then its
        # tensors and response as they are made; 503 when it is not there.
        hold = self.budget.hold(min(request.content_length or self.max_body_bytes, self.max_body_bytes))
        try:
            body = self._body_now(request)
            if body is None:
                body = await self._read(request)
            args = (info["model"], info.get("version"), body, header_length, hold.take)
            decoded = decode_request(*args) if len(body) <= OFFLOAD_BYTES else await self._codec(
                "decode", len(body), decode_request, *args)
            del body, args  # the tensors may still point into it (binary data); the rest can go
            dataplane = self.dataplane
            if dataplane.runs_inline(decoded.request, self.inline_max_us, entry):
                self._inline_inc(1)
                response = dataplane.infer(decoded.request, "http", entry)
            elif entry.batcher is not None:  # one thread hop per batch, not per request
                response = await dataplane.infer_batched(decoded.request, "http", entry)
            else:
                response = await self._offload(dataplane.infer, decoded.request, "http", entry)
            size = response_bytes(response)
            hold.take(size * 4)  # JSON text of numbers takes up to ~4x their binary size
            if size <= OFFLOAD_BYTES:
                payload, json_length = encode_response(response, decoded.binary_outputs, decoded.all_binary)
            else:
                payload, json_length = await self._codec(
                    "encode", size, encode_response, response, decoded.binary_outputs, decoded.all_binary)
        finally:
            if hold.release():  # memory goes back to the OS once big requests are done
                self._trim_soon()
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, headers={HEADER_LENGTH: str(json_length), "Content-Type": BINARY_TYPE})
