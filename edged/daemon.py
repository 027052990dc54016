"""The daemon: wires config, metrics, registry, data plane and transports,
and runs them on one asyncio loop until SIGTERM/SIGINT. SIGHUP reloads."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Protocol

from edged.config import Config, load_config
from edged.dataplane import DataPlane
from edged.metrics import Metrics
from edged.registry import ModelRegistry
from edged.transports.http import HttpTransport

log = logging.getLogger(__name__)


class Service(Protocol):
    """Anything started after models load and stopped before they unload."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.registry = ModelRegistry(config, self.metrics)
        self.dataplane = DataPlane(config, self.registry, self.metrics)
        self.http = HttpTransport(
            self.dataplane, config.http.host, config.http.port, config.http.max_body_bytes,
            workers=max(4, config.max_concurrency * 4), inline_max_us=config.http.inline_max_us,
        )
        self.services: list[Service] = []
        # Called with short status lines ("loading models", "ready", ...).
        self.status_listeners: list[Callable[[str], None]] = []
        self.ready_listeners: list[Callable[[], None]] = []
        self.stopping_listeners: list[Callable[[], None]] = []
        self.reloading_listeners: list[Callable[[], None]] = []
        # Coroutines run on the loop for the daemon's whole life (e.g. watchdog pings).
        self.loop_tasks: list[Callable[[], Awaitable[None]]] = []
        # Run (in a thread) before the models load, e.g. OTA crash recovery.
        self.prestart: list[Callable[[], None]] = []
        self._stop = asyncio.Event()

    def status(self, message: str) -> None:
        log.info("%s", message)
        for listener in self.status_listeners:
            listener(message)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        background = [asyncio.ensure_future(task()) for task in self.loop_tasks]
        if self.config.http.enabled:
            await self.http.start()
        for hook in self.prestart:
            await asyncio.to_thread(hook)
        self.status(f"loading models from {self.config.models_path}")
        await asyncio.to_thread(self.dataplane.start)
        for service in self.services:
            await service.start()
        ready = [e for e in self.registry.index() if e.ready]
        failed = [e for e in self.registry.index() if e.state.value == "FAILED"]
        summary = f"ready: {len(ready)} model version(s) serving on http://{self.config.http.host}:{self.http.port}"
        if failed:
            summary += "; not ready: " + ", ".join(f"{e.name} {e.version} ({e.reason})" for e in failed)
        broken = self.registry.broken()
        if broken:
            summary += "; unusable bundles: " + ", ".join(f"{path} ({why})" for path, why in sorted(broken.items()))
        self.status(summary)
        for listener in self.ready_listeners:
            listener()
        await self._stop.wait()
        self.status("stopping")
        for listener in self.stopping_listeners:
            listener()
        for service in reversed(self.services):
            await service.stop()
        await self.http.stop()
        await asyncio.to_thread(self.dataplane.stop)
        for task in background:
            task.cancel()

    def request_stop(self) -> None:
        self._stop.set()

    async def reload(self) -> None:
        """Re-read models (new bundles load before old ones unload). Ready
        listeners run afterwards whatever happens, so systemd leaves "reloading"."""
        for listener in self.reloading_listeners:
            listener()
        self.status("reloading models")
        try:
            if self.config_path:
                try:
                    fresh = load_config(self.config_path)
                except Exception as exc:
                    self.status(f"reload refused, config invalid: {exc}")
                    return
                self.config.load, self.config.versions = fresh.load, fresh.versions
            await asyncio.to_thread(self.registry.load_initial)
            self.status(f"reloaded: {sum(1 for e in self.registry.index() if e.ready)} model version(s) ready")
        finally:
            for listener in self.ready_listeners:
                listener()
