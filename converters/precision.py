"""Automatic precision, and latency against fp32 on the same runtime.

``precision = "auto"`` (profile) or ``--precision auto``: ``choose`` builds
the candidates -- int8, int8 with float nodes when int8 needed tuning, fp16
where the runtime runs it, fp32 -- validates each through the pipeline's
``session.attempt``, times them on the target runtime through edged's own
``LoadedModel`` (as the daemon runs them: batch 1, the profile's threads,
interleaved rounds), and keeps the fastest candidate that passes the gate.

Whatever the precision, ``compare_with_fp32`` times the chosen bundle against
fp32 on the same runtime and says so in one line when int8 is not faster.
Every ratio written here is between two models on the same runtime.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ConversionError, ConverterUnavailable, Skipped

TIMING_BUDGET_S = 8.0  # wall time for the interleaved rounds of one comparison
ROUNDS = 12
MIN_CALLS, MAX_CALLS = 3, 50  # calls per candidate per round
WARMUP_CALLS = 5
TIE = 0.03  # passing candidates within 3% of the fastest count as equally fast: the smallest wins
RUNTIME_NAMES = {"onnx": "onnxruntime", "openvino": "OpenVINO", "tflite": "TFLite"}


def timing_budget(session: Any) -> float:
    """TIMING_BUDGET_S, scaled down with ``--latency-runs`` below its default."""
    from converters.report import LATENCY_RUNS

    return TIMING_BUDGET_S * min(1.0, session.target.latency_runs / LATENCY_RUNS)


def runtime_options(profile: Any, runtime: str) -> Any:
    """The profile's options for ``runtime`` as the daemon takes them."""
    from edged.runtimes import RuntimeOptions

    extra = dict(profile.runtime_options(runtime))
    threads = int(extra.pop("threads", 0) or 0)
    extra.pop("per_channel", None)
    return RuntimeOptions(threads=threads, extra=extra)


def time_interleaved(bundles: dict[str, Path], samples: Any, options: Any,
                     budget_s: float = TIMING_BUDGET_S) -> dict[str, dict[str, float]]:
    """p50/p90 latency (ms) of each bundle, batch 1, one sample per call,
    in interleaved rounds (each round runs every model, in a rotated order)
    so that load on the machine hits them alike."""
    from converters.data import rename_feed
    from edged.bundle import open_bundle
    from edged.model import LoadedModel

    models: dict[str, Any] = {}
    try:
        for label, path in bundles.items():
            models[label] = LoadedModel.load(open_bundle(path), options, warmup=0)
        names = {label: [s.name for s in m.bundle.manifest.inputs] for label, m in models.items()}
        feeds = {label: [rename_feed(samples.sample(i), names[label]) for i in range(len(samples))]
                 for label in models}
        probe = []
        for label, model in models.items():
            for feed in (feeds[label] * WARMUP_CALLS)[:WARMUP_CALLS]:
                model.infer(feed)
            began = time.perf_counter()
            model.infer(feeds[label][0])
            probe.append(time.perf_counter() - began)
        per_round = max(sum(probe), 1e-5)
        calls = int(min(MAX_CALLS, max(MIN_CALLS, budget_s / (ROUNDS * per_round))))
        times: dict[str, list[float]] = {label: [] for label in models}
        labels = list(models)
        for r in range(ROUNDS):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                model, inputs = models[label], feeds[label]
                for k in range(calls):
                    feed = inputs[(r * calls + k) % len(inputs)]
                    began = time.perf_counter()
                    model.infer(feed)
                    times[label].append((time.perf_counter() - began) * 1e3)
    finally:
        for model in models.values():
            model.unload()
    return {label: {"p50": round(float(np.percentile(t, 50)), 4), "p90": round(float(np.percentile(t, 90)), 4),
                    "calls": len(t)} for label, t in times.items()}


def _setup(runtime: str, options: Any, timed: dict[str, dict[str, float]]) -> str:
    calls = next(iter(timed.values()))["calls"] if timed else 0
    threads = options.threads or "the runtime's default"
    return (f"{RUNTIME_NAMES.get(runtime, runtime)} through edged's LoadedModel, batch 1, threads {threads}, "
            f"{ROUNDS} interleaved rounds, {calls} calls per candidate, this machine")


def _size(attempt: Any) -> int:
    return int(attempt.report.get("size_bytes", {}).get("converted", 0))


def plan_auto(profile: Any, source: Any) -> Any:
    """The plan for ``precision = "auto"``: the int8 plan of the profile's
    runtime (its checks), or the fp32 one when int8 cannot be built here."""
    from converters.plan import plan_for

    try:
        plan = plan_for(dataclasses.replace(profile, precision="int8"), source)
    except Skipped as exc:
        plan = plan_for(dataclasses.replace(profile, precision="fp32"), source)
        plan.notes.append(f"auto precision: no int8 candidate ({exc})")
        plan.provenance["auto_without_int8"] = str(exc)
    plan.precision = "auto"
    plan.provenance["profile_precision"] = "auto"
    return plan


def _candidate(session: Any, converter: Any, label: str, failures: list[dict[str, Any]]) -> Any | None:
    try:
        return session.attempt(converter, label)
    except (ConversionError, ConverterUnavailable) as exc:
        failures.append({"label": label, "passed": False, "error": str(exc)})
        session.progress.note(f"{session.profile.name}: auto precision: {label} candidate failed: {exc}")
        return None


def choose(session: Any, converter: Any) -> Any:
    """Build, validate and time every candidate; the fastest that passes, with
    the candidate table in its report under ``precision_auto``. When none
    passes, the int8 attempt comes back (the pipeline's gate refuses it)."""
    from converters import get_converter
    from converters.tune import float_converter, float_precisions, tune

    runtime = session.plan.runtime
    failures: list[dict[str, Any]] = []
    int8_converter = get_converter(runtime, precision="int8") if runtime in ("onnx", "openvino") else converter
    built = []
    first = None
    if "auto_without_int8" not in session.plan.provenance:
        first = _candidate(session, int8_converter, "int8", failures)
    if first is not None and first.report.get("precision") != "int8":  # quantized nothing: the fp32 candidate
        failures.append({"label": "int8", "passed": False, "skipped": True,
                         "error": "; ".join(first.report.get("notes", [])) or "int8 kept the fp32 model"})
        first = None
    if first is not None:
        built.append(first)
        if not first.passed and session.target.tune_budget_s > 0:
            tuned = tune(session, first, fallback=False)
            if tuned is not None:
                built.append(tuned)
    for precision in float_precisions(runtime, first):
        attempt = _candidate(session, float_converter(runtime, precision, first), precision, failures)
        if attempt is not None:
            built.append(attempt)
    if runtime == "onnx" and "fp16" not in float_precisions(runtime):
        failures.append({"label": "fp16", "passed": False, "skipped": True,
                         "error": "not built: ONNX fp16 needs onnxconverter-common (pip install onnxconverter-common)"})
    if not built:
        reasons = list(dict.fromkeys(f["error"] for f in failures if not f.get("skipped")))
        raise ConversionError(f"{session.profile.name}: auto precision built no candidate: "
                              + ("; ".join(reasons) if len(reasons) == 1 else
                                 "; ".join(f"{f['label']}: {f['error']}" for f in failures)))
    options = runtime_options(session.profile, runtime)
    with session.progress.stage(f"{session.profile.name}: timing {len(built)} candidates on {runtime} (interleaved)"):
        timed = time_interleaved({a.label: a.staged for a in built}, session.data.validation, options,
                                 timing_budget(session))
    passing = [a for a in built if a.passed]
    chosen, why = _pick(passing, timed, runtime) if passing else (first or built[0], "no candidate passed the gate")
    fp32 = next((a for a in built if a.report.get("precision") == "fp32" and a.label == "fp32"), None)
    rows = [_row(a, timed, fp32) for a in built] + failures
    chosen.report["precision_auto"] = {"candidates": rows, "chosen": chosen.label, "why": why,
                                       "setup": _setup(runtime, options, timed)}
    _same_runtime(chosen, timed, fp32, runtime, options, auto=True, int8=first.label if first else None)
    session.progress.done(f"{session.profile.name}: auto precision: {chosen.label} ({why})")
    if "speed_note" in chosen.report:
        session.progress.note(f"{session.profile.name}: {chosen.report['speed_note']}")
    return chosen


def _row(attempt: Any, timed: dict[str, dict[str, float]], fp32: Any | None) -> dict[str, Any]:
    report = attempt.report
    row: dict[str, Any] = {
        "label": attempt.label, "precision": report.get("precision"), "passed": attempt.passed,
        "verdicts": [v["text"] for v in report["gate"]["verdicts"]] + report.get("collapsed", []),
        "latency_ms": timed.get(attempt.label), "size_bytes": _size(attempt),
    }
    if fp32 is not None and attempt.label in timed and fp32.label in timed:
        row["vs_fp32"] = round(timed[attempt.label]["p50"] / max(timed[fp32.label]["p50"], 1e-9), 3)
    float_nodes = [n["node"] for n in report.get("float_nodes", [])]
    if float_nodes:
        row["float_nodes"] = float_nodes
    return row


def _pick(passing: list[Any], timed: dict[str, dict[str, float]], runtime: str) -> tuple[Any, str]:
    fastest = min(passing, key=lambda a: timed[a.label]["p50"])
    best = timed[fastest.label]["p50"]
    close = [a for a in passing if timed[a.label]["p50"] <= best * (1 + TIE)]
    chosen = min(close, key=lambda a: (_size(a), timed[a.label]["p50"]))
    others = [a for a in passing if a is not chosen]
    name = RUNTIME_NAMES.get(runtime, runtime)
    if chosen is fastest:
        why = f"fastest passing candidate on {name} ({best:.3f} ms p50)"
        if others:
            runner = min(others, key=lambda a: timed[a.label]["p50"])
            why += f"; next {runner.label} at {timed[runner.label]['p50']:.3f} ms"
    else:
        why = (f"within {100 * TIE:.0f}% of the fastest ({fastest.label}, {best:.3f} ms p50) on {name} "
               f"and smaller ({_size(chosen) / 1024:.0f} KiB against {_size(fastest) / 1024:.0f} KiB)")
    return chosen, why


def _same_runtime(chosen: Any, timed: dict[str, dict[str, float]], fp32: Any | None, runtime: str, options: Any,
                  auto: bool, int8: str | None = None) -> None:
    """``latency_same_runtime`` in the chosen report, and ``speed_note`` when
    int8 (the chosen one, or auto's int8 candidate) is not faster than fp32."""
    report = chosen.report
    block: dict[str, Any] = {"runtime": runtime, "setup": _setup(runtime, options, timed),
                             "chosen": {"label": chosen.label, **timed.get(chosen.label, {})}}
    report["latency_same_runtime"] = block
    if fp32 is None or fp32.label not in timed:
        return
    block["fp32"] = timed[fp32.label]
    block["chosen_vs_fp32"] = round(timed[chosen.label]["p50"] / max(timed[fp32.label]["p50"], 1e-9), 3)
    int8 = chosen.label if report.get("precision") == "int8" else int8
    if int8 is None or int8 not in timed:
        _float_slower(report, block, runtime, fp32.label)
        return
    ratio = timed[int8]["p50"] / max(timed[fp32.label]["p50"], 1e-9)
    block["int8_vs_fp32"] = round(ratio, 3)
    if ratio < 1.0:
        return
    what = f"{ratio:.2f}x slower than" if ratio >= 1.05 else f"not faster than ({ratio:.2f}x the latency of)"
    name = "int8" if int8 == "int8" else f"int8 ({int8})"
    if auto:
        tail = f"; auto shipped {chosen.label}"
    else:
        tail = "; --precision auto would ship fp32" if fp32.passed else ""
    report["speed_note"] = f"{name} is {what} fp32 on {RUNTIME_NAMES.get(runtime, runtime)} here{tail}"


def _float_slower(report: dict[str, Any], block: dict[str, Any], runtime: str, fp32_label: str) -> None:
    """A shipped fp16 (e.g. the accuracy fallback) that timed slower than fp32
    on the same runtime: one line saying so."""
    ratio = block.get("chosen_vs_fp32")
    if report.get("precision") != "fp16" or ratio is None or ratio < 1.0 or block["chosen"]["label"] == fp32_label:
        return
    what = f"{ratio:.2f}x slower than" if ratio >= 1.05 else f"not faster than ({ratio:.2f}x the latency of)"
    report["speed_note"] = (f"fp16 is {what} fp32 on {RUNTIME_NAMES.get(runtime, runtime)} here "
                            "(fp16 halves the size; the device may differ)")


def compare_with_fp32(session: Any, chosen: Any) -> None:
    """Time ``chosen`` against an fp32 build on the same runtime; writes
    ``latency_same_runtime`` and, when int8 is not faster, ``speed_note``
    (also shown as a note)."""
    from converters.tune import _quick, float_converter, float_precisions

    runtime = session.plan.runtime
    options = runtime_options(session.profile, runtime)
    if "fp32" not in float_precisions(runtime, chosen):
        chosen.report["latency_same_runtime"] = {
            "runtime": runtime, "note": f"no fp32 {runtime} model is built by this route; no same-runtime ratio"}
        _slower_than_source(session, chosen, runtime)
        return
    fp32 = chosen if chosen.report.get("precision") == "fp32" else None
    if fp32 is None:
        try:
            fp32 = _quick(session).attempt(float_converter(runtime, "fp32", chosen), "fp32")
        except (ConversionError, ConverterUnavailable) as exc:
            chosen.report["latency_same_runtime"] = {"runtime": runtime, "note": f"fp32 build failed: {exc}"}
            return
    bundles = {chosen.label: chosen.staged} if fp32 is chosen else {chosen.label: chosen.staged, fp32.label: fp32.staged}
    with session.progress.stage(f"{session.profile.name}: timing {chosen.label} against fp32 on {runtime}"):
        timed = time_interleaved(bundles, session.data.validation, options, timing_budget(session))
    _same_runtime(chosen, timed, fp32, runtime, options, auto=False)
    if "speed_note" in chosen.report:
        session.progress.note(f"{session.profile.name}: {chosen.report['speed_note']}")


def _slower_than_source(session: Any, chosen: Any, runtime: str) -> None:
    """Without an fp32 model on the same runtime, still say so in one line when
    the int8 bundle is slower than the fp32 source on its own runtime (from the
    validation report's batch-1 figures, the only pair measured)."""
    lat = chosen.report.get("latency_ms", {})
    source, converted = lat.get("source", {}).get("p50"), lat.get("converted", {}).get("p50")
    if not source or not converted or converted <= source:
        return
    runner = chosen.report.get("source_runner", "its framework")
    chosen.report["speed_note"] = (
        f"{chosen.report.get('precision', 'int8')} on {RUNTIME_NAMES.get(runtime, runtime)} is "
        f"{converted / source:.2f}x slower than the fp32 source on {runner} here (no fp32 {runtime} model "
        "to compare on the same runtime); time it on the device, or pick an ONNX profile")
    session.progress.note(f"{session.profile.name}: {chosen.report['speed_note']}")
