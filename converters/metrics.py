"""Validation metrics that fit the output, and the gate per ``--task``.

Every output is compared with the source model's: cosine similarity, SQNR in
dB, and max / mean absolute error relative to the fp32 output's range. Top-1
agreement (and accuracy with labels) is computed only for classifiers. An
output that collapsed (constant, near-zero variance where fp32 varies, NaN or
Inf) is reported separately: it is an error whatever the gate says.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

COLLAPSE_STD_RATIO = 1e-2  # converted std below 1% of the source's std: collapsed
MIN_MATCH_RATE = 0.9  # integer outputs (class ids, argmax per step): share of equal elements


@dataclass(frozen=True)
class Task:
    """What a model's outputs mean: it picks the gate metric and threshold."""

    name: str
    metric: str  # "top1" (drop in points), "cosine" or "sqnr_db"
    threshold: float  # top1: max drop in points; cosine / sqnr_db: minimum
    help: str


TASKS = {
    "classify": Task("classify", "top1", 1.0, "class scores: top-1 agreement (accuracy with labels)"),
    "detect": Task("detect", "cosine", 0.95, "detection rows or score maps: cosine similarity"),
    "segment": Task("segment", "cosine", 0.95, "per-pixel maps: cosine similarity"),
    "sequence": Task("sequence", "cosine", 0.95, "per-step scores (CTC, tokens): cosine similarity"),
    "embed": Task("embed", "cosine", 0.98, "embeddings: cosine similarity"),
    "regress": Task("regress", "sqnr_db", 20.0, "values (features, spectrograms): SQNR in dB"),
    "auto": Task("auto", "cosine", 0.97, "no --task and no labels: cosine similarity"),
}


def pick_task(name: str | None, has_labels: bool) -> Task:
    """The named task; without one, classify when labels are given, else ``auto``."""
    if name:
        return TASKS[name]
    return TASKS["classify"] if has_labels else TASKS["auto"]


@dataclass
class OutputMetrics:
    name: str
    cosine: float
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float
    max_abs_error_rel: float  # relative to the fp32 output's range (max - min)
    mean_abs_error_rel: float
    fp32_range: float
    top1_agreement: float | None = None
    match_rate: float | None = None  # integer outputs: share of elements equal to fp32's
    accuracy_source: float | None = None
    accuracy_converted: float | None = None
    collapse: str | None = None  # why the output counts as collapsed

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _finite(v: float) -> float:
    return float(v) if math.isfinite(v) else (1e9 if v > 0 else -1e9)


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, *, classify: bool,
                   labels: np.ndarray | None = None) -> OutputMetrics:
    """``ref`` and ``got`` are [N, ...] for N samples of one output."""
    integer = np.asarray(ref).dtype.kind in "iub"
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        got = got.reshape(ref.shape) if got.size == ref.size else got
    collapse = collapse_reason(ref, got)
    finite = np.where(np.isfinite(got), got, 0.0)
    err = np.abs(finite - ref)
    span = float(ref.max() - ref.min()) if ref.size else 0.0
    denom = span if span > 0 else max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
    signal, noise = float(np.sum(ref * ref)), float(np.sum(err * err))
    norms = math.sqrt(signal) * float(np.linalg.norm(finite))
    cosine = float(np.sum(ref * finite) / norms) if norms > 0 else (1.0 if noise == 0 else 0.0)
    sqnr = 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else (200.0 if noise == 0 else -200.0)
    metrics = OutputMetrics(
        name=name, cosine=round(_finite(cosine), 6), sqnr_db=round(_finite(sqnr), 3),
        max_abs_error=float(err.max()) if err.size else 0.0, mean_abs_error=float(err.mean()) if err.size else 0.0,
        max_abs_error_rel=float(err.max() / denom) if err.size else 0.0,
        mean_abs_error_rel=float(err.mean() / denom) if err.size else 0.0,
        fp32_range=span, collapse=collapse,
    )
    if integer:
        metrics.match_rate = float(np.mean(ref == finite)) if ref.shape == finite.shape else 0.0
    if classify and not integer:
        ref_top, got_top = _top1(ref), _top1(finite)
        metrics.top1_agreement = float(np.mean(ref_top == got_top))
        if labels is not None and len(labels) == len(ref_top):
            metrics.accuracy_source = float(np.mean(ref_top == labels))
            metrics.accuracy_converted = float(np.mean(got_top == labels))
    return metrics


def collapse_reason(ref: np.ndarray, got: np.ndarray) -> str | None:
    """Why ``got`` cannot be a faithful version of ``ref``, or None."""
    bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
    if bad:
        return f"{bad} NaN/Inf values"
    ref_std, got_std = float(np.std(ref)), float(np.std(got))
    if ref_std <= 1e-12 * max(1.0, float(np.abs(ref).max(initial=0.0))):
        return None  # the source output is constant too: nothing to compare the spread with
    if float(np.ptp(got)) == 0.0:
        return f"constant output ({float(got.flat[0]):.4g}) where fp32 varies (std {ref_std:.4g})"
    if got_std < COLLAPSE_STD_RATIO * ref_std:
        return f"near-zero variance (std {got_std:.3g} against fp32 std {ref_std:.3g})"
    return None


def _top1(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(len(a), -1).argmax(axis=1)


@dataclass
class Verdict:
    output: str
    metric: str
    value: float
    threshold: float
    passed: bool

    def describe(self) -> str:
        if self.metric == "top1":
            return f"{self.output}: top-1 drop {self.value:.2f} points (max {self.threshold:g})"
        if self.metric == "match":
            return f"{self.output}: {100 * self.value:.1f}% equal elements (min {100 * self.threshold:g}%)"
        unit = " dB" if self.metric == "sqnr_db" else ""
        name = "SQNR" if self.metric == "sqnr_db" else "cosine"
        return f"{self.output}: {name} {self.value:.4g}{unit} (min {self.threshold:g}{unit})"


def judge(metrics: list[OutputMetrics], task: Task, threshold: float | None = None) -> list[Verdict]:
    """One verdict per output with the task's metric. Top-1 applies to the
    first output (the class scores); the others are held to cosine >= 0.95."""
    limit = task.threshold if threshold is None else threshold
    verdicts = []
    for i, m in enumerate(metrics):
        if m.match_rate is not None:  # integer output: cosine and top-1 do not apply
            verdicts.append(Verdict(m.name, "match", m.match_rate, MIN_MATCH_RATE, m.match_rate >= MIN_MATCH_RATE))
        elif task.metric == "top1" and i == 0:
            if m.accuracy_source is not None and m.accuracy_converted is not None:
                drop = 100.0 * (m.accuracy_source - m.accuracy_converted)
            else:
                drop = 100.0 * (1.0 - (m.top1_agreement or 0.0))
            verdicts.append(Verdict(m.name, "top1", round(drop, 4), limit, drop <= limit))
        elif task.metric == "sqnr_db":
            verdicts.append(Verdict(m.name, "sqnr_db", m.sqnr_db, limit, m.sqnr_db >= limit))
        else:
            floor = limit if task.metric == "cosine" else TASKS["detect"].threshold
            verdicts.append(Verdict(m.name, "cosine", m.cosine, floor, m.cosine >= floor))
    return verdicts
