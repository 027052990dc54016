"""Timing helpers shared by the benchmark sections."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(call: Callable[[], object], seconds: float = 2.0, concurrency: int = 1, warmup: int = 20) -> dict[str, float]:
    """Run ``call`` in ``concurrency`` threads for ``seconds``; latency in µs."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    stop = [0.0]

    errors: list[BaseException] = []

    def worker(bucket: list[float]) -> None:
        try:
            for _ in range(warmup):  # in this thread: some clients are per-thread
                call()
            barrier.wait()
            barrier.wait()
            while time.perf_counter() < stop[0]:
                start = time.perf_counter()
                call()
                bucket.append(time.perf_counter() - start)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # the run fails with it instead of hanging at the barrier
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(b,)) for b in latencies]
    for t in threads:
        t.start()
    try:
        barrier.wait()
        start = time.perf_counter()
        stop[0] = start + seconds
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a benchmark client failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    elapsed = time.perf_counter() - start
    flat = [x * 1e6 for b in latencies for x in b]
    return {
        "p50_us": round(percentile(flat, 50), 1),
        "p99_us": round(percentile(flat, 99), 1),
        "mean_us": round(statistics.fmean(flat), 1),
        "rps": round(len(flat) / elapsed, 1),
        "n": len(flat),
    }
