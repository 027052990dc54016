"""The daemon: wires config, metrics, registry, data plane and transports,
and runs them on one asyncio loop until SIGTERM/SIGINT. SIGHUP reloads.

Only SIGTERM and SIGINT stop the daemon, and the log names which one did. One
reload runs at a time: a SIGHUP during a reload (or during start-up) is folded
into one more pass that runs when the current one has finished, inside the
same RELOADING=1 ... READY=1 bracket. A stop that arrives during a reload
waits for the models being loaded before unloading everything."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Protocol

from edged.config import Config, load_config
from edged.dataplane import DataPlane
from edged.metrics import Metrics
from edged.registry import BROKEN_VERSION, ModelRegistry
from edged.transports.http import HttpTransport
from edged.transports.http_body import keep_freed_memory

log = logging.getLogger(__name__)


def trim_heap() -> bool:
    """Hand freed heap memory back to the OS with glibc's ``malloc_trim``: loading
    a model reads, parses and copies its file, and malloc keeps what was freed
    (in every thread's arena) as part of the RSS. False where the C library
    has no ``malloc_trim`` (musl)."""
    from edged.transports.http_body import find_malloc_trim

    trim = find_malloc_trim()
    if trim is False:
        return False
    trim(0)
    return True


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
        self.stop_reason = ""
        self._started = False
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_wanted = False
        self.reloads_coalesced = 0  # SIGHUPs folded into a reload already running

    def status(self, message: str) -> None:
        log.info("%s", message)
        for listener in self.status_listeners:
            listener(message)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        background = [asyncio.ensure_future(task()) for task in self.loop_tasks]
        if self.config.http.enabled:
            await self.http.start()
        for hook in self.prestart:
            await asyncio.to_thread(hook)
        self.status(f"loading models from {self.config.models_path}")
        await asyncio.to_thread(self.dataplane.start)
        trim_heap()
        keep_freed_memory()  # from here on; the idle trim after big requests hands it back
        for service in self.services:
            await service.start()
        ready = [e for e in self.registry.index() if e.ready]
        failed = [e for e in self.registry.index() if e.state.value == "FAILED" and e.version != BROKEN_VERSION]
        summary = f"ready: {len(ready)} model version(s) serving on http://{self.config.http.host}:{self.http.port}"
        if failed:
            summary += "; not ready: " + ", ".join(f"{e.name} {e.version} ({e.reason})" for e in failed)
        broken = self.registry.broken()
        if broken:
            summary += "; unusable bundles: " + ", ".join(f"{path} ({why})" for path, why in sorted(broken.items()))
        self.status(summary)
        for listener in self.ready_listeners:
            listener()
        self._started = True
        if self._reload_wanted:  # a SIGHUP arrived while starting
            self._reload_wanted = False
            self.request_reload()
        await self._stop.wait()
        self.status(f"stopping ({self.stop_reason or 'stop requested'})")
        if self._reload_task is not None and not self._reload_task.done():
            self.status("waiting for the reload in progress to finish before stopping")
            await asyncio.shield(self._reload_task)
        for listener in self.stopping_listeners:
            listener()
        for service in reversed(self.services):
            await service.stop()
        await self.http.stop()
        await asyncio.to_thread(self.dataplane.stop)
        for task in background:
            task.cancel()

    def request_stop(self, reason: str = "requested") -> None:
        """Stop the daemon (SIGTERM, SIGINT or a caller); the reason is logged."""
        if not self._stop.is_set():
            self.stop_reason = reason
            log.info("stop requested by %s", reason)
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: start a reload, or fold this request into the one running (or
        into start-up): never two at once, never a stop."""
        if self._stop.is_set():
            log.info("reload requested while stopping; ignored")
            return
        if not self._started or (self._reload_task is not None and not self._reload_task.done()):
            self._reload_wanted = True
            self.reloads_coalesced += 1
            log.info("reload requested while %s; one more pass follows", "starting" if not self._started else "reloading")
            return
        self._reload_task = asyncio.ensure_future(self.reload())  # kept: a bare task may be collected

    async def reload(self) -> None:
        """Re-read models (new bundles load before old ones unload), again while
        more reloads were requested meanwhile. Ready listeners run afterwards
        whatever happens, so systemd leaves "reloading"."""
        for listener in self.reloading_listeners:
            listener()
        try:
            while True:
                self._reload_wanted = False
                await self._reload_once()
                if not self._reload_wanted or self._stop.is_set():
                    break
        finally:
            for listener in self.ready_listeners:
                listener()

    async def _reload_once(self) -> None:
        self.status("reloading models")
        if self.config_path:
            try:
                fresh = load_config(self.config_path)
            except Exception as exc:
                self.status(f"reload refused, config invalid: {exc}")
                return
            self.config.load, self.config.versions = fresh.load, fresh.versions
        await asyncio.to_thread(self.registry.load_initial)
        trim_heap()
        self.status(f"reloaded: {sum(1 for e in self.registry.index() if e.ready)} model version(s) ready")
