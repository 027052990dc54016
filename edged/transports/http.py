"""KServe V2 REST over aiohttp, compatible with tritonclient.http.

Routes follow Triton's HTTP API. Inference runs in a thread pool so the event
loop never blocks on a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from aiohttp import web

from edged.dataplane import DataPlane
from edged.errors import EdgedError, InvalidInput, PayloadTooLarge
from edged.v2 import HEADER_LENGTH, decode_request, encode_response, parse_json_object

log = logging.getLogger(__name__)

# The one place error codes become HTTP statuses.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 400,
    "bundle_invalid": 400,
    "signature_invalid": 400,
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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: EdgedError) -> web.Response:
    return _json({"error": exc.message, "code": exc.code}, STATUS_BY_CODE.get(exc.code, 500))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EdgedError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(PayloadTooLarge(f"request body is over the limit: {exc.text}"))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _json({"error": exc.reason, "code": "http"}, exc.status)
        raise
    except Exception as exc:  # never let a request take the daemon down
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _json({"error": f"internal error: {type(exc).__name__}: {exc}", "code": "internal"}, 500)


class HttpTransport:
    """The aiohttp application and server for one data plane."""

    def __init__(self, dataplane: DataPlane, host: str, port: int, max_body_bytes: int, workers: int = 8,
                 inline_max_us: float = 0.0) -> None:
        self.dataplane = dataplane
        self.inline_max_us = inline_max_us
        from prometheus_client import Counter

        self.m_inline = Counter("edged_http_inline_requests", "HTTP inferences run on the event loop (no thread hop).",
                                registry=dataplane.metrics.registry)
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edged-infer")
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[_errors])
        r = app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        r.add_post("/v2/repository/models/{model}/rollback", self.rollback)
        r.add_get("/v2/ota/status", self.ota_status)
        r.add_post("/v2/ota/update", self.ota_update)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/config", self.model_config)
            r.add_post(prefix + "/infer", self.infer)
        r.add_get("/metrics", self.metrics)
        return app

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:  # report the port the OS picked
            server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor
            if server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
        log.info("HTTP listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.executor.shutdown(wait=True, cancel_futures=False)

    async def _offload(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    # -- health and metadata ---------------------------------------------
    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(self.dataplane.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.dataplane.ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = request.match_info
        return _json(self.dataplane.model_metadata(info["model"], info.get("version")))

    async def model_ready(self, request: web.Request) -> web.Response:
        info = request.match_info
        ok = self.dataplane.model_ready(info["model"], info.get("version"))
        return _json({"name": info["model"], "ready": ok}, 200 if ok else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        info = request.match_info
        meta = self.dataplane.model_metadata(info["model"], info.get("version"))
        config = {
            "name": meta["name"],
            "platform": meta["platform"],
            "input": [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in meta.get("inputs", [])],
            "output": [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in meta.get("outputs", [])],
        }
        return _json(config)

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.dataplane.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- repository -------------------------------------------------------
    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await self._read(request)
        if not raw.strip():
            return {}
        return parse_json_object(raw, "a JSON object")

    async def repository_index(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
        rows = await self._offload(self.dataplane.repository_index, bool(data.get("ready", False)))
        return _json(rows)

    async def load(self, request: web.Request) -> web.Response:
        await self._json_body(request)
        await self._offload(self.dataplane.load_model, request.match_info["model"])
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        await self._json_body(request)
        await self._offload(self.dataplane.unload_model, request.match_info["model"])
        return _json({})

    # -- OTA (edged extension) -----------------------------------------------
    async def rollback(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
        version = await self._offload(self.dataplane.rollback, request.match_info["model"], data.get("version"))
        return _json({"model": request.match_info["model"], "active": version})

    async def ota_status(self, request: web.Request) -> web.Response:
        return _json(self.dataplane.ota_status())

    async def ota_update(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
        result = await self._offload(self.dataplane.ota_update, data)
        return _json({"result": result}, 202)

    # -- inference --------------------------------------------------------
    async def _read(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(
                f"request body is {length} bytes; the limit is {self.max_body_bytes} (http.max_body_bytes)"
            )
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes (http.max_body_bytes)") from None

    async def infer(self, request: web.Request) -> web.Response:
        info = request.match_info
        self.dataplane.check_model(info["model"], info.get("version"))
        body = await self._read(request)
        header = request.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
        decoded = decode_request(info["model"], info.get("version"), body, header_length)
        if self.dataplane.runs_inline(decoded.request, self.inline_max_us):
            self.m_inline.inc()
            response = self.dataplane.infer(decoded.request, "http")
        else:
            response = await self._offload(self.dataplane.infer, decoded.request, "http")
        payload, json_length = encode_response(response, decoded.binary_outputs, decoded.all_binary)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            headers={HEADER_LENGTH: str(json_length), "Content-Type": "application/octet-stream"},
        )
