"""``edged bench BUNDLE``: the runtime call timed in this process, per thread count
and batch size, like TFLite's benchmark_model or OpenVINO's benchmark_app."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.bench.inputs import InputSpec, check_batches, fixed_batch, load_input_file, random_inputs, with_batch
from edged.bench.stats import BenchError, ProgressFn, latency_summary, peak_rss_mb, rate
from edged.errors import EdgedError

PROGRESS_EVERY_S = 0.1


@dataclass(frozen=True)
class LocalOptions:
    """Sweep and bounds. Each configuration runs ``warmup`` untimed calls, then timed
    calls until ``duration_s`` passed or ``iterations`` ran, whichever comes first."""

    threads: tuple[int, ...] = (1,)
    batches: tuple[int, ...] = ()  # () = the model's own batch (1 when dynamic)
    duration_s: float = 3.0
    iterations: int = 100_000
    warmup: int = 10
    input_path: Path | None = None


def bench_bundle(path: Path, options: LocalOptions, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Load the bundle once per thread count and time ``LoadedModel.infer`` on
    native-dtype inputs for each batch size. Returns the JSON document."""
    from edged.bundle import open_bundle

    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:  # an archive unpacks here
        bundle = open_bundle(Path(path), unpack_dir=Path(tmp))
        manifest = bundle.manifest
        specs = [InputSpec(s.name, s.dtype, tuple(s.shape)) for s in manifest.inputs]
        batches = list(options.batches) or [fixed_batch(specs) or 1]
        check_batches(manifest.name, specs, batches)
        base, source = _base_inputs(bundle, specs, options.input_path)
        feeds = {b: _native(manifest.inputs, with_batch(base, b) if base else random_inputs(specs, b))
                 for b in batches}
        rows = []
        for threads in options.threads:
            rows.extend(_bench_threads(bundle, threads, feeds, options, on_progress))
    return {
        "mode": "bundle",
        "bundle": str(path),
        "model": manifest.name,
        "version": manifest.version,
        "runtime": manifest.runtime,
        "runtime_version": _runtime_version(manifest.runtime),
        "inputs": {name: {"dtype": a.dtype.name, "shape": list(a.shape)} for name, a in feeds[batches[0]].items()},
        "input_source": source,
        "warmup": options.warmup,
        "duration_s": options.duration_s,
        "iterations": options.iterations,
        "results": rows,
        "peak_rss_mb": peak_rss_mb(),
    }


def _base_inputs(bundle: Any, specs: list[InputSpec], input_path: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """The rows batches are built from, and where they came from."""
    if input_path is not None:
        return load_input_file(input_path, specs), str(input_path)
    try:
        samples, _ = bundle.load_samples()
    except (OSError, ValueError) as exc:
        raise BenchError(f"{bundle.root}: cannot read samples.npz: {exc}") from None
    if samples and all(s.name in samples for s in specs):
        return {s.name: samples[s.name] for s in specs}, "samples.npz"
    return {}, "random, shaped by the manifest"


def _native(declared: list[Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float samples of a quantized input become its native int8/uint8, so the timed
    call is the runtime's, not the quantization edged does for float clients."""
    out = {}
    for spec in declared:
        array = arrays[spec.name]
        if spec.quantization is not None and array.dtype.name != spec.dtype:
            array = spec.quantization.quantize(array, np.dtype(spec.dtype))
        elif array.dtype.name != spec.dtype and array.dtype.kind == np.dtype(spec.dtype).kind:
            array = array.astype(spec.dtype)  # e.g. float64 from a user's .npy for a float32 input
        out[spec.name] = array
    return out


def _bench_threads(bundle: Any, threads: int, feeds: dict[int, dict[str, np.ndarray]], options: LocalOptions,
                   on_progress: ProgressFn | None) -> list[dict[str, Any]]:
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    start = time.perf_counter()
    try:
        model = LoadedModel.load(bundle, RuntimeOptions(threads=threads), warmup=0)
    except EdgedError:
        raise
    except Exception as exc:  # the runtime library's own failure, as one line
        raise BenchError(f"{bundle.manifest.name}: the {bundle.manifest.runtime} runtime cannot load it with "
                         f"{threads} threads: {type(exc).__name__}: {_first_line(exc)}") from None
    load_s = time.perf_counter() - start
    rows = []
    try:
        for batch, feed in feeds.items():
            label = f"threads {threads or 'default'}, batch {batch}"
            latencies, elapsed = _time_calls(model, feed, options, label, on_progress)
            rows.append({"threads": threads, "batch": batch, "runs": len(latencies), "seconds": round(elapsed, 3),
                         **latency_summary(latencies), "runs_per_s": rate(len(latencies), elapsed),
                         "items_per_s": rate(len(latencies) * batch, elapsed), "load_s": round(load_s, 3),
                         "peak_rss_mb": peak_rss_mb()})
    finally:
        model.unload()
    return rows


def _time_calls(model: Any, feed: dict[str, np.ndarray], options: LocalOptions, label: str,
                on_progress: ProgressFn | None) -> tuple[list[float], float]:
    """Warm-up, then timed calls; returns each call's seconds and the wall time."""
    clock = time.perf_counter
    try:
        for _ in range(options.warmup):
            model.infer(feed)
        latencies: list[float] = []
        start = shown = clock()
        deadline = start + options.duration_s
        while len(latencies) < options.iterations:
            t0 = clock()
            model.infer(feed)
            t1 = clock()
            latencies.append(t1 - t0)
            if t1 >= deadline:
                break
            if on_progress is not None and t1 - shown >= PROGRESS_EVERY_S:
                on_progress(label, max((t1 - start) / options.duration_s, len(latencies) / options.iterations))
                shown = t1
        elapsed = clock() - start
    except EdgedError:
        raise
    except Exception as exc:  # the runtime's own failure, as one line
        raise BenchError(f"{model.name} ({model.bundle.manifest.runtime}) failed at {label}: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from None
    if on_progress is not None:
        on_progress(label, 1.0)
    return latencies, elapsed


def _runtime_version(runtime: str) -> str | None:
    from edged.runtimes import runtime_versions

    try:
        return runtime_versions().get(runtime)
    except Exception:  # metadata of an odd install: the version is only informative
        return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
