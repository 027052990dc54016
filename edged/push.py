"""Push the daemon's metrics registry to a Prometheus Pushgateway.

Runs in its own thread so it never blocks inference. A gateway that is down
costs a timeout, a counted failure and a growing back-off, nothing more.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, delete_from_gateway, push_to_gateway

from edged.config import Config
from edged.metrics import Metrics

log = logging.getLogger(__name__)


class MetricsPusher:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.cfg = config.push
        self.registry = metrics.registry
        self.grouping = {"instance": config.device}
        self.failures = Counter("edged_push_failures", "Failed pushes to the Pushgateway.", registry=self.registry)
        self.pushes = Counter("edged_push", "Successful pushes to the Pushgateway.", registry=self.registry)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def push_once(self) -> bool:
        try:
            push_to_gateway(self.cfg.url, job=self.cfg.job, registry=self.registry,
                            grouping_key=self.grouping, timeout=self.cfg.timeout_s)
        except Exception as exc:  # URLError/timeout, or a gateway answering 4xx/5xx: never kill the thread
            self.failures.inc()
            log.warning("push to %s failed: %s", self.cfg.url, exc)
            return False
        self.pushes.inc()
        return True

    def _loop(self) -> None:
        delay = self.cfg.interval_s
        while not self._stop.is_set():
            ok = self.push_once()
            delay = self.cfg.interval_s if ok else min(delay * 2, max(300.0, self.cfg.interval_s))
            self._stop.wait(delay)

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edged-push", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.timeout_s + 1)
        if self.cfg.delete_on_shutdown:
            try:
                delete_from_gateway(self.cfg.url, job=self.cfg.job, grouping_key=self.grouping, timeout=self.cfg.timeout_s)
            except OSError as exc:
                log.warning("deleting the metrics group from %s failed: %s", self.cfg.url, exc)
