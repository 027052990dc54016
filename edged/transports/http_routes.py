"""The control and health handlers of the KServe V2 REST API (server and model
metadata, health, repository load/unload, and edged's rollback and OTA routes).

``ControlRoutes`` is a base class of ``edged.transports.http.HttpTransport``, which
routes to these handlers, checks their access and provides the body reading and
worker-thread helpers they use. Inference is not here: see ``HttpTransport.infer``
and the lean path (``edged.transports.http_fast``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from edged.v2 import dumps, parse_json_object

if TYPE_CHECKING:
    from edged.dataplane import DataPlane


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(data), status=status, content_type="application/json", headers=headers)


class ControlRoutes:
    """Handlers that answer from the data plane's state or change it (admin routes)."""

    dataplane: "DataPlane"

    async def _read(self, request: web.Request) -> bytearray:
        raise NotImplementedError

    async def _offload(self, func: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def _codec(self, what: str, size: int, func: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    # -- health and metadata ---------------------------------------------
    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(self.dataplane.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.dataplane.ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = request.match_info
        return json_response(self.dataplane.model_metadata(info["model"], info.get("version")))

    async def model_ready(self, request: web.Request) -> web.Response:
        info = request.match_info
        ok = self.dataplane.model_ready(info["model"], info.get("version"))
        return json_response({"name": info["model"], "ready": ok}, 200 if ok else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        info = request.match_info
        meta = self.dataplane.model_metadata(info["model"], info.get("version"))
        config = {
            "name": meta["name"],
            "platform": meta["platform"],
            "input": [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in meta.get("inputs", [])],
            "output": [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in meta.get("outputs", [])],
        }
        return json_response(config)

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.dataplane.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- repository -------------------------------------------------------
    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await self._read(request)
        if not raw.strip():
            return {}
        return await self._codec("decode", len(raw), parse_json_object, raw, "a JSON object")

    async def repository_index(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
        rows = await self._offload(self.dataplane.repository_index, bool(data.get("ready", False)))
        return json_response(rows)

    async def load(self, request: web.Request) -> web.Response:
        await self._json_body(request)
        await self._offload(self.dataplane.load_model, request.match_info["model"])
        return json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await self._json_body(request)
        await self._offload(self.dataplane.unload_model, request.match_info["model"])
        return json_response({})

    # -- OTA (edged extension) -----------------------------------------------
    async def rollback(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
        version = await self._offload(self.dataplane.rollback, request.match_info["model"], data.get("version"))
        return json_response({"model": request.match_info["model"], "active": version})

    async def ota_status(self, request: web.Request) -> web.Response:
        return json_response(self.dataplane.ota_status())

    async def ota_update(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
        result = await self._offload(self.dataplane.ota_update, data)
        return json_response({"result": result}, 202)
