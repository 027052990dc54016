"""Accuracy-aware int8: when the first int8 attempt misses the gate (or an
output collapsed), try others within ``target.tune_budget_s``.

ONNX (onnxruntime QDQ): rank the nodes by the noise they add
(``converters.sensitivity``, onnxruntime's ``qdq_loss_debug``), try the known
levers (Percentile and Entropy calibration, per-channel weights flipped,
symmetric activations), then keep 1, 2, 4, 8 ... of the worst nodes in float
(``nodes_to_exclude``) with the best of those settings until the gate passes.
OpenVINO (nncf): the mixed preset, then the same ranking as an nncf
``IgnoredScope``. TFLite routes are not tuned here. When nothing passes,
fall back to fp16 where the runtime runs it, else fp32 on the same runtime,
and say so with the metric of each (TFLite: the onnx2tf route's fp16 and
fp32 twins, written by its int8 run; the other TFLite routes have none).

Every candidate goes through ``session.attempt`` (staging, validation and
the gate are the pipeline's own); each step's metric lands in the chosen
attempt's report under ``"tuning"``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from converters.errors import ConversionError, ConverterUnavailable, EdgedError

TUNE_LATENCY_RUNS = 20  # the candidates' own validation timing; converters.precision times the final ones
SENSITIVITY_SAMPLES = 8


@dataclass
class Step:
    step: str
    float_nodes: list[str]
    verdicts: list[str]
    passed: bool
    seconds: float
    precision: str = "int8"
    score: float | None = None  # worst verdict's margin, relative to its threshold (>= 0 passes)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def margin(report: dict[str, Any]) -> float:
    """How far the worst output is from its threshold, relative to it:
    >= 0 passes; a collapsed output is -inf."""
    if report.get("collapsed"):
        return -math.inf
    worst = math.inf
    for v in report["gate"]["verdicts"]:
        value, limit = float(v["value"]), float(v["threshold"])
        if v["metric"] == "top1":  # a drop in points: lower is better
            gap = (limit - value) / max(limit, 1.0)
        elif v["metric"] in ("cosine", "match"):
            gap = (value - limit) / max(1.0 - limit, 1e-6)
        else:  # sqnr_db
            gap = (value - limit) / max(abs(limit), 1.0)
        worst = min(worst, gap)
    return worst if worst != math.inf else 0.0


def _verdict_texts(report: dict[str, Any]) -> list[str]:
    texts = [v["text"] for v in report["gate"]["verdicts"]]
    return texts + [f"COLLAPSED {c}" for c in report.get("collapsed", [])]


@dataclass
class Tuner:
    """One tuning run: its steps, the budget and the best attempt so far."""

    session: Any
    first: Any
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    steps: list[Step] = field(default_factory=list)
    attempt_seconds: list[float] = field(default_factory=list)

    @property
    def runtime(self) -> str:
        return str(self.first.report.get("runtime") or self.session.plan.runtime)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def affordable(self, factor: float = 1.0) -> bool:
        """Another attempt fits in the budget (estimated from the ones so far)."""
        estimate = max(self.attempt_seconds) if self.attempt_seconds else 0.0
        return self.left() > factor * estimate

    def run(self, label: str, converter: Any, float_nodes: list[str], precision: str = "int8") -> Any | None:
        """One candidate through the pipeline's attempt; None when it fails to convert."""
        if precision == "int8" and not label.startswith("int8"):
            label = f"int8, {label}"
        began = time.perf_counter()
        try:
            attempt = _quick(self.session).attempt(converter, label)
        except (ConversionError, ConverterUnavailable) as exc:
            seconds = time.perf_counter() - began
            self.attempt_seconds.append(seconds)
            self.steps.append(Step(label, float_nodes, [f"failed to convert: {exc}"], False, round(seconds, 2),
                                   precision))
            return None
        seconds = time.perf_counter() - began
        self.attempt_seconds.append(seconds)
        self.steps.append(Step(label, float_nodes, _verdict_texts(attempt.report), attempt.passed,
                               round(seconds, 2), attempt.report.get("precision", precision),
                               round(margin(attempt.report), 4)))
        return attempt


def _quick(session: Any) -> Any:
    """The session with fewer latency runs per candidate (same staging and attempts list)."""
    runs = min(session.target.latency_runs, TUNE_LATENCY_RUNS)
    return dataclasses.replace(session, target=dataclasses.replace(session.target, latency_runs=runs))


def tune(session: Any, first: Any, fallback: bool = True) -> Any | None:
    """A passing attempt found within ``session.target.tune_budget_s``, or None.
    With ``fallback``, fp16 (where the runtime runs it) then fp32 on the same
    runtime are the last resort. The tuning steps go into the returned
    attempt's report, or into ``first.report`` when nothing passed."""
    tuner = Tuner(session, first, float(session.target.tune_budget_s))
    tuner.attempt_seconds.append(float(first.report.get("conversion_seconds", 0.0)))
    tuner.steps.append(Step("int8", [], _verdict_texts(first.report), first.passed,
                            float(first.report.get("conversion_seconds", 0.0)),
                            first.report.get("precision", "int8"), round(margin(first.report), 4)))
    session.progress.note(f"{session.profile.name}: int8 missed the gate; tuning for up to "
                          f"{tuner.budget_s:.0f} s (--tune-budget-s)")
    found, ranking = None, None
    if tuner.runtime == "onnx":
        found, ranking = _tune_onnx(tuner)
    elif tuner.runtime == "openvino":
        found, ranking = _tune_openvino(tuner)
    else:
        tuner.steps.append(Step(f"{tuner.runtime}: no int8 tuning for the TFLite routes; float fallback next",
                                [], [], False, 0.0, "-"))
    if found is None and fallback:
        found = _fall_back(tuner)
    chosen = found or first
    report = chosen.report
    report["tuning"] = [s.to_dict() for s in tuner.steps]
    if found is not None:
        float_nodes = next((s.float_nodes for s in reversed(tuner.steps) if s.passed), [])
        if float_nodes and ranking is not None:
            why = {node: ranking.reason(node) for node in float_nodes}
            report["float_nodes"] = [{"node": node, "why": text} for node, text in why.items()]
        report["tuning_result"] = _summary(tuner, found, float_nodes)
        session.progress.note(f"{session.profile.name}: {report['tuning_result']}")
        if report.get("precision") != "int8":
            report.setdefault("notes", []).append(report["tuning_result"])
    else:
        report["tuning_result"] = (f"no candidate passed the gate in {len(tuner.steps)} steps "
                                   f"({time.perf_counter() - tuner.started:.0f} s)")
    return found


def _summary(tuner: Tuner, found: Any, float_nodes: list[str]) -> str:
    step = next(s for s in reversed(tuner.steps) if s.passed)
    seconds = time.perf_counter() - tuner.started
    if found.report.get("precision") != "int8":
        tries = sum(1 for s in tuner.steps[1:] if s.precision == "int8")
        missed = "; ".join(tuner.steps[0].verdicts) or "missed the gate"
        passed = "; ".join(_verdict_texts(found.report))
        found.report["fallback"] = {"from": "int8", "to": found.report.get("precision"), "runtime": tuner.runtime,
                                    "int8": tuner.steps[0].verdicts, "int8_tuning_steps": tries,
                                    "fallback": _verdict_texts(found.report)}
        return (f"int8 missed the gate ({missed}); fell back to {found.report.get('precision')} on "
                f"{tuner.runtime}, which passes ({passed}); {tries} int8 tuning step(s) before")
    if float_nodes:
        return (f"int8 passes with {len(float_nodes)} node(s) kept in float ({step.step}; "
                f"{len(tuner.steps) - 1} tuning steps, {seconds:.0f} s)")
    return f"int8 passes with {step.step} ({len(tuner.steps) - 1} tuning steps, {seconds:.0f} s)"


def _onnx_levers(base: Any) -> Iterator[tuple[str, Any]]:
    yield "calibration Percentile", dataclasses.replace(base, calibration="Percentile")
    yield "symmetric activations", dataclasses.replace(base, symmetric_activations=True)
    yield (f"per-channel weights {'off' if base.per_channel else 'on'}",
           dataclasses.replace(base, per_channel=not base.per_channel))
    yield "calibration Entropy", dataclasses.replace(base, calibration="Entropy")


def _growth(count: int) -> Iterator[int]:
    n = 1
    while n < count:
        yield n
        n *= 2
    yield count


def _grow(tuner: Tuner, ranking: Any | None, build: Any, suffix: str, score: float) -> Any | None:
    """Keep nodes in float, step by step: the output nodes (and what quantizes
    their inputs) alone, kept in the later sets only when that helped; then
    1, 2, 4, 8 ... of the ranked nodes, up to all of them. ``build(nodes)``
    makes the converter."""
    if ranking is None:
        return None
    prefix: list[str] = []
    sets: list[list[str]] = [list(ranking.output_nodes)] if ranking.output_nodes else []
    first_output_step = bool(sets)
    while True:
        if not sets:
            rest = [n for n in ranking.float_node_order() if n not in prefix]
            sets = [prefix + rest[:count] for count in _growth(len(rest))] if rest else []
            if not sets:
                return None
        nodes = sets.pop(0)
        label = f"{len(nodes)} node(s) in float{suffix}"
        if not tuner.affordable():
            tuner.steps.append(Step(f"{label}: skipped, tuning budget spent", nodes, [], False, 0.0))
            return None
        attempt = tuner.run(label, build(nodes), nodes)
        if attempt is not None and attempt.passed:
            return attempt
        if first_output_step:
            first_output_step = False
            if attempt is not None and margin(attempt.report) > score + 1e-3:
                prefix = nodes
            sets = []
        elif not sets:
            return None


def _onnx_converter(options: Any) -> Any:
    from converters.onnx_qdq import OnnxQDQConverter

    return OnnxQDQConverter("int8", options.per_channel, options.calibration, options.symmetric_activations,
                            options.nodes_to_exclude)


def _rank(tuner: Tuner, quantized: Path | None) -> Any | None:
    """The sensitivity ranking of the first attempt's QDQ graph (or of a
    fresh plain int8 quantization), recorded as a step."""
    from converters.onnx_qdq import QuantOptions, prepare_float_model, quantize_prepared
    from converters.sensitivity import rank_nodes

    session = tuner.session
    began = time.perf_counter()
    work = session.staging / "tune-sensitivity"
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare_float_model(session.model_path("onnx"), work)
        if quantized is None or not quantized.is_file():
            quantized = work / "int8.onnx"
            per_channel = bool(session.profile.runtime_options("onnx").get("per_channel", True))
            quantize_prepared(prepared, quantized, session.data.calibration, QuantOptions(per_channel))
        ranking = rank_nodes(prepared, quantized, session.data.calibration.head(SENSITIVITY_SAMPLES), work / "debug")
    except (EdgedError, RuntimeError, ValueError, KeyError, OSError) as exc:
        tuner.steps.append(Step("sensitivity (onnxruntime qdq_loss_debug)", [], [f"failed: {exc}"], False,
                                round(time.perf_counter() - began, 2)))
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = [loss.why() for loss in ranking.losses[:5]]
    tuner.steps.append(Step("sensitivity (onnxruntime qdq_loss_debug)", [], worst or ["no node adds noise"], False,
                            round(time.perf_counter() - began, 2), precision="-"))
    return ranking


def _tune_onnx(tuner: Tuner) -> tuple[Any | None, Any | None]:
    from converters.onnx_qdq import QuantOptions

    per_channel = bool(tuner.session.profile.runtime_options("onnx").get("per_channel", True))
    base = QuantOptions(per_channel)
    first_model = tuner.first.staged / "model.onnx" if tuner.first.report.get("precision") == "int8" else None
    ranking = _rank(tuner, first_model)
    best, best_score = base, margin(tuner.first.report)
    for label, options in _onnx_levers(base):
        if not tuner.affordable(1.5 if options.calibration == "Entropy" else 1.0):
            tuner.steps.append(Step(f"{label}: skipped, tuning budget spent", [], [], False, 0.0))
            continue
        attempt = tuner.run(label, _onnx_converter(options), [])
        if attempt is None:
            continue
        if attempt.passed:
            return attempt, ranking
        if margin(attempt.report) > best_score:
            best, best_score = options, margin(attempt.report)
    found = _grow(tuner, ranking, lambda nodes: _onnx_converter(dataclasses.replace(
        best, nodes_to_exclude=tuple(nodes))), _describe_options(best, base), best_score)
    return found, ranking


def _describe_options(options: Any, base: Any) -> str:
    changes = []
    if options.calibration != base.calibration:
        changes.append(f"calibration {options.calibration}")
    if options.symmetric_activations != base.symmetric_activations:
        changes.append("symmetric activations")
    if options.per_channel != base.per_channel:
        changes.append(f"per-channel {'on' if options.per_channel else 'off'}")
    return f", {', '.join(changes)}" if changes else ""


def _tune_openvino(tuner: Tuner) -> tuple[Any | None, Any | None]:
    from converters.openvino_ir import OpenVinoConverter

    ranking = _rank(tuner, None) if importlib.util.find_spec("onnxruntime") else None
    best_preset, best_score = None, margin(tuner.first.report)
    if tuner.affordable():
        attempt = tuner.run("nncf preset mixed", OpenVinoConverter("int8", preset="mixed"), [])
        if attempt is not None and attempt.passed:
            return attempt, ranking
        if attempt is not None and margin(attempt.report) > best_score:
            best_preset, best_score = "mixed", margin(attempt.report)
    found = _grow(tuner, ranking, lambda nodes: OpenVinoConverter("int8", preset=best_preset, float_nodes=nodes),
                  f" (nncf IgnoredScope{', preset mixed' if best_preset else ''})", best_score)
    return found, ranking


def float_precisions(runtime: str, attempt: Any | None = None) -> list[str]:
    """The float precisions this repository writes for ``runtime``, best first.
    TFLite: those of the route that built ``attempt`` (onnx2tf writes fp16 and
    fp32 twins of its int8 model; the other TFLite routes write int8 only)."""
    if runtime == "openvino":
        return ["fp16", "fp32"]
    if runtime == "onnx":
        return (["fp16"] if importlib.util.find_spec("onnxconverter_common") else []) + ["fp32"]
    if runtime == "tflite" and attempt is not None and hasattr(attempt.converter, "float_variant"):
        from converters.tflite_onnx2tf import FLOAT_PRECISIONS

        return list(FLOAT_PRECISIONS)
    return []


def float_converter(runtime: str, precision: str, attempt: Any | None = None) -> Any:
    """The converter for ``precision`` on ``runtime``; for TFLite, the float
    twin of the route that built ``attempt``."""
    from converters import get_converter

    if runtime == "tflite" and attempt is not None and hasattr(attempt.converter, "float_variant"):
        return attempt.converter.float_variant(precision)
    return get_converter(runtime, precision=precision)


def _fall_back(tuner: Tuner) -> Any | None:
    """fp16 where the runtime runs it, else fp32 on the same runtime (budget or not)."""
    precisions = float_precisions(tuner.runtime, tuner.first)
    if not precisions:
        tuner.steps.append(Step(f"fallback: no float writer for {tuner.runtime} here", [], [], False, 0.0, "-"))
        return None
    if tuner.runtime == "onnx" and "fp16" not in precisions:
        tuner.steps.append(Step("fallback fp16: skipped, ONNX fp16 needs onnxconverter-common "
                                "(pip install onnxconverter-common)", [], [], False, 0.0, "fp16"))
    for precision in precisions:
        attempt = tuner.run(f"fallback {precision} on {tuner.runtime}",
                            float_converter(tuner.runtime, precision, tuner.first), [], precision)
        if attempt is not None and attempt.passed:
            return attempt
    return None


