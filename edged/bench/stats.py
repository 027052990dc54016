"""What every benchmark mode shares: option lists, latency summaries, peak RSS."""

from __future__ import annotations

import resource
import sys
from typing import Callable

import numpy as np

from edged.errors import EdgedError

# on_progress(label, fraction done in 0..1): the command line draws it as a bar.
ProgressFn = Callable[[str, float], None]


class BenchError(EdgedError):
    """Bad benchmark input, or a target that cannot be benchmarked; one line for the user."""

    code = "invalid_input"


def parse_counts(text: str, option: str, minimum: int = 1) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``: whole numbers >= ``minimum``, duplicates dropped."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise BenchError(f"{option} {text!r}: expected comma-separated whole numbers, e.g. 1,2,4") from None
        if value < minimum:
            raise BenchError(f"{option} {text!r}: every value must be {minimum} or more, got {value}")
        if value not in values:
            values.append(value)
    return values


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """p50, p90, p99, mean, min and max in milliseconds (empty: zeros)."""
    if not seconds:
        return {key: 0.0 for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": _round(p50), "p90_ms": _round(p90), "p99_ms": _round(p99),
            "mean_ms": _round(ms.mean()), "min_ms": _round(ms.min()), "max_ms": _round(ms.max())}


def _round(value: float) -> float:
    """Four significant digits: 0.02817 ms and 1234.0 ms both stay readable."""
    return float(f"{float(value):.4g}")


def rate(count: int, seconds: float) -> float:
    return _round(count / seconds) if seconds > 0 else 0.0


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)
