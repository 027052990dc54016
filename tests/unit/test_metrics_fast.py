"""The request path's metric shortcuts write exactly what prometheus_client's own methods write."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edged.metrics import LATENCY_BUCKETS, fast_inc, fast_observe


def _samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#") and "_created" not in line]


def test_fast_observe_and_inc_match_prometheus_client():
    values = [0.0, 0.00005, 0.00007, 0.001, 0.0025, 0.3, 2.5, 7.0, 1e9]  # bounds themselves, between, past the last
    registries = []
    for fast in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("h", "h", ["m"], buckets=LATENCY_BUCKETS, registry=registry).labels("a")
        counter = Counter("c", "c", ["m"], registry=registry).labels("a")
        gauge = Gauge("g", "g", ["m"], registry=registry).labels("a")
        observe = fast_observe(hist) if fast else hist.observe
        inc = fast_inc(counter) if fast else counter.inc
        depth = fast_inc(gauge) if fast else gauge.inc
        for value in values:
            observe(value)
            inc(1)
            depth(1)
        depth(-2)
        registries.append(registry)
    assert _samples(registries[0]) == _samples(registries[1])
    assert 'h_bucket{le="5e-05",m="a"} 2.0' in _samples(registries[1])
    assert 'g{m="a"} 7.0' in _samples(registries[1])


def test_fast_helpers_fall_back_to_the_public_methods():
    class Plain:
        def inc(self, amount: float = 1) -> None: ...

        def observe(self, amount: float) -> None: ...

    plain = Plain()
    assert fast_inc(plain) == plain.inc
    assert fast_observe(plain) == plain.observe
