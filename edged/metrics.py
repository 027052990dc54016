"""Prometheus metrics on one registry per daemon (no global state).

The same ``Metrics.registry`` is served on HTTP /metrics and pushed to a
Pushgateway, so both always agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Metrics:
    """All of the daemon's metrics. Other components add theirs to ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edged_inference_requests", "Inference requests received.",
            ["model", "version", "transport"], registry=r,
        )
        self.failures = Counter(
            "edged_inference_failures", "Inference requests that failed, by error code.",
            ["model", "version", "transport", "code"], registry=r,
        )
        self.latency = Histogram(
            "edged_inference_duration_seconds", "Time spent running the model.",
            ["model", "version", "runtime"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "edged_queue_duration_seconds", "Time a request waited for a free model slot.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "edged_queue_depth", "Requests waiting for or holding a model slot.",
            ["model", "version"], registry=r,
        )
        self.load_time = Gauge(
            "edged_model_load_duration_seconds", "Seconds the last load of the model took.",
            ["model", "version", "runtime"], registry=r,
        )
        self.model_ready = Gauge(
            "edged_model_ready", "1 when the model version is ready to serve.",
            ["model", "version"], registry=r,
        )
        self.models_loaded = Gauge("edged_models_loaded", "Model versions loaded and ready.", registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds
        r.register(DeviceCollector())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def fast_inc(child: Any) -> Callable[[float], None]:
    """``child.inc`` (a Counter or Gauge with its labels set, or one without labels) for
    the request path: the value's own locked increment, without prometheus_client's
    per-call checks (three Python calls fewer). ``child.inc`` itself when this
    prometheus_client keeps its value differently. A gauge goes down with ``inc(-1)``."""
    inc = getattr(getattr(child, "_value", None), "inc", None)
    return inc if callable(inc) else child.inc


def fast_observe(child: Any) -> Callable[[float], None]:
    """``child.observe`` of a Histogram with its labels set, as :func:`fast_inc`: the
    sum and the one bucket that counts the value, each a locked increment."""
    try:
        total = child._sum.inc
        pairs = tuple(zip(child._upper_bounds, [bucket.inc for bucket in child._buckets]))
    except (AttributeError, TypeError):
        return child.observe
    if not pairs or pairs[-1][0] != float("inf"):
        return child.observe

    first_bound, first_inc = pairs[0]

    def observe(amount: float) -> None:
        if amount <= first_bound:  # the common case of a fast model (and of no wait for a slot)
            if amount:
                total(amount)  # adding 0 to the sum changes nothing
            first_inc(1)
            return
        total(amount)
        for bound, inc in pairs:
            if amount <= bound:  # the last bound is +Inf: every value lands somewhere
                inc(1)
                return

    return observe


class DeviceCollector(Collector):
    """CPU temperature and throttling, where /sys exposes them (Raspberry Pi,
    Jetson, most x86 laptops); nothing on machines that do not."""

    def __init__(self, sys_root: Path = Path("/sys")) -> None:
        self.sys_root = sys_root

    def collect(self) -> Iterator[GaugeMetricFamily]:
        temps = GaugeMetricFamily("edged_device_temperature_celsius", "Thermal zone temperatures.", labels=["zone", "type"])
        found = False
        for zone in sorted((self.sys_root / "class" / "thermal").glob("thermal_zone*")):
            try:
                milli = int((zone / "temp").read_text().strip())
                kind = (zone / "type").read_text().strip()
            except (OSError, ValueError):
                continue
            temps.add_metric([zone.name, kind], milli / 1000.0)
            found = True
        if found:
            yield temps
        throttled = self.sys_root / "devices" / "platform" / "soc" / "soc:firmware" / "get_throttled"
        try:
            value = int(throttled.read_text().strip(), 16)
        except (OSError, ValueError):
            return
        family = GaugeMetricFamily("edged_device_throttled", "1 while the firmware reports throttling (Raspberry Pi get_throttled bit 2).")
        family.add_metric([], 1.0 if value & 0x4 else 0.0)
        yield family
