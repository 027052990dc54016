"""The validation report: the converted bundle against the source model.

Every output is compared on the held-out samples, one call per sample (as
the daemon runs a batch-1 model), with the metrics of ``converters.metrics``;
the gate of the task decides, and a collapsed output always fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from converters.data import Samples, rename_feed
from converters.metrics import Task, compare_output, judge
from converters.source import SOURCE_RUNNERS, Source, run_per_sample

LATENCY_RUNS = 200
LATENCY_WARMUP = 10
NON_MODEL_FILES = ("samples.npz", "report.json")


def latency_ms(call: Callable[[dict[str, np.ndarray]], Any], samples: Samples, runs: int) -> dict[str, float]:
    """p50 / p99 of ``runs`` calls, one sample each, after a warm-up."""
    n = len(samples)
    for i in range(LATENCY_WARMUP):
        call(samples.sample(i % n))
    times = []
    for i in range(runs):
        feed = samples.sample(i % n)
        start = time.perf_counter()
        call(feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": round(float(np.percentile(times, 50)), 4), "p99": round(float(np.percentile(times, 99)), 4)}


def _output_pairs(source_names: list[str], converted_names: list[str]) -> list[tuple[str, str]]:
    """(source output, converted output): by name where they match, else by position."""
    if set(source_names) <= set(converted_names):
        return [(n, n) for n in source_names]
    return list(zip(source_names, converted_names))


def build_report(bundle_root: Path, source: Source, samples: Samples, data_name: str, task: Task,
                 threshold: float | None = None, runs: int = LATENCY_RUNS) -> dict[str, Any]:
    """Converted vs source on ``samples``: per-output metrics, gate verdicts,
    collapse, latency (batch 1, one thread) and size."""
    from edged.bundle import open_bundle
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    bundle = open_bundle(bundle_root)
    ref = source.run_all(samples)
    model = LoadedModel.load(bundle, RuntimeOptions(threads=1), warmup=0)
    names = [spec.name for spec in bundle.manifest.inputs]

    def run_converted(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return model.infer(rename_feed(feed, names))

    try:
        got = run_per_sample(run_converted, samples)
        conv_latency = latency_ms(run_converted, samples, runs)
    finally:
        model.unload()
    src_latency = latency_ms(source.run, samples, runs)
    pairs = _output_pairs(list(ref), [o.name for o in bundle.manifest.outputs])
    metrics = [
        compare_output(conv, ref[src], got[conv], classify=task.metric == "top1" and i == 0, labels=samples.labels)
        for i, (src, conv) in enumerate(pairs)
    ]
    verdicts = judge(metrics, task, threshold)
    collapsed = [f"{m.name}: {m.collapse}" for m in metrics if m.collapse]
    report: dict[str, Any] = {
        "data": data_name,
        "samples": len(samples),
        "task": task.name,
        "outputs": [m.to_dict() for m in metrics],
        "gate": {
            "metric": task.metric, "passed": all(v.passed for v in verdicts) and not collapsed,
            "verdicts": [{**v.__dict__, "text": v.describe()} for v in verdicts],
        },
        "latency_ms": {"source": src_latency, "converted": conv_latency},
        "source_runner": {"onnx": "onnxruntime", "tf": "TensorFlow", "torch": "PyTorch"}[source.kind],
        "latency_setup": f"batch 1, 1 thread, {runs} runs each after {LATENCY_WARMUP} warm-up, this machine; "
                         f"source on {SOURCE_RUNNERS[source.kind]}, converted through edged's runtime "
                         f"({bundle.manifest.runtime}) incl. input/output (de)quantization",
        "size_bytes": {
            "source": _source_size(source.original),
            "converted": sum(e.size for rel, e in bundle.manifest.files.items() if rel not in NON_MODEL_FILES),
        },
    }
    if collapsed:
        report["collapsed"] = collapsed
    first = metrics[0]
    if first.top1_agreement is not None:  # the keys earlier reports had, for classifiers
        report["top1_agreement"] = first.top1_agreement
        report["agreement_drop_points"] = round(100.0 * (1.0 - first.top1_agreement), 4)
        if first.accuracy_source is not None:
            report["accuracy_source"] = first.accuracy_source
            report["accuracy_converted"] = first.accuracy_converted
            report["accuracy_drop_points"] = round(100.0 * (first.accuracy_source - first.accuracy_converted), 4)
    return report


def _source_size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def failed_verdicts(report: dict[str, Any]) -> list[str]:
    return [v["text"] for v in report["gate"]["verdicts"] if not v["passed"]]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def report_tables(report: dict[str, Any], title: str) -> list[Any]:
    """Rich tables: one row per output with its metrics and verdict, then latency and size."""
    from rich.table import Table

    outputs = Table(title=f"{title} ({report.get('runtime', '?')} {report.get('precision', '')}, "
                          f"task {report['task']}, {report['samples']} {report['data']} samples)")
    for col in ("output", "cosine", "SQNR dB", "max err", "mean err", "top-1", "gate"):  # errors: % of the fp32 range
        outputs.add_column(col, justify="left" if col in ("output", "gate") else "right")
    verdicts = {v["output"]: v for v in report["gate"]["verdicts"]}
    collapsed = {c.split(":", 1)[0] for c in report.get("collapsed", [])}
    for m in report["outputs"]:
        v = verdicts.get(m["name"])
        gate = "COLLAPSED" if m["name"] in collapsed else ("-" if v is None else ("pass" if v["passed"] else "FAIL"))
        outputs.add_row(
            m["name"], f"{m['cosine']:.4f}", f"{m['sqnr_db']:.1f}",
            f"{100 * m['max_abs_error_rel']:.2f}%", f"{100 * m['mean_abs_error_rel']:.2f}%",
            _pct(m.get("top1_agreement", m.get("match_rate"))), gate,
        )
    figures = Table(title="latency and size")
    figures.add_column("")
    figures.add_column(f"source fp32 ({report.get('source_runner', 'its framework')})", justify="right")
    figures.add_column("converted", justify="right")
    lat, size = report["latency_ms"], report["size_bytes"]
    if "accuracy_source" in report:
        figures.add_row("accuracy", _pct(report["accuracy_source"]), _pct(report["accuracy_converted"]))
    figures.add_row("latency p50 (ms)", f"{lat['source']['p50']:.3f}", f"{lat['converted']['p50']:.3f}")
    figures.add_row("latency p99 (ms)", f"{lat['source']['p99']:.3f}", f"{lat['converted']['p99']:.3f}")
    figures.add_row("size", f"{size['source'] / 1024:.1f} KiB", f"{size['converted'] / 1024:.1f} KiB")
    if "conversion_seconds" in report:
        figures.add_row("conversion time", "", f"{report['conversion_seconds']:.2f} s")
    return [outputs, figures, *same_runtime_tables(report)]


# -- converters.precision: candidates and latency on the target runtime ------

def same_runtime_tables(report: dict[str, Any]) -> list[Any]:
    """The auto-precision candidates, or the chosen model against fp32, timed
    on the same runtime (``precision_auto`` / ``latency_same_runtime``)."""
    from rich.table import Table

    same = report.get("latency_same_runtime") or {}
    auto = report.get("precision_auto")
    if auto:
        table = Table(title=f"auto precision on {same.get('runtime', report.get('runtime', '?'))}: "
                            f"{auto['chosen']} ({auto['why']})")
        for col in ("candidate", "gate", "p50 ms", "p90 ms", "vs fp32", "size"):
            table.add_column(col, justify="left" if col in ("candidate", "gate") else "right")
        for row in auto["candidates"]:
            lat = row.get("latency_ms") or {}
            gate = "pass" if row.get("passed") else ("n/a" if row.get("skipped") else
                                                     "error" if "error" in row else "FAIL")
            table.add_row(("* " if row["label"] == auto["chosen"] else "  ") + row["label"], gate,
                          f"{lat['p50']:.3f}" if lat else "-", f"{lat['p90']:.3f}" if lat else "-",
                          f"{row['vs_fp32']:.2f}x" if "vs_fp32" in row else "-",
                          f"{row['size_bytes'] / 1024:.1f} KiB" if row.get("size_bytes") else "-")
        return [table]
    if "fp32" not in same:
        return []
    table = Table(title=f"latency on {same['runtime']} (same runtime, interleaved, batch 1)")
    for col in ("", "p50 ms", "p90 ms", "vs fp32"):
        table.add_column(col, justify="left" if not col else "right")
    chosen = same["chosen"]
    table.add_row(chosen["label"], f"{chosen['p50']:.3f}", f"{chosen['p90']:.3f}", f"{same['chosen_vs_fp32']:.2f}x")
    if chosen["label"] != "fp32":
        table.add_row("fp32", f"{same['fp32']['p50']:.3f}", f"{same['fp32']['p90']:.3f}", "1.00x")
    return [table]
