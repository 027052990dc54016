"""Section "conversion": the real-model corpus through ``edged convert`` on every profile.

One row per model x profile (``benchmarks.corpus``): the outcome, the task's gate measured
over HTTP through a daemon serving the bundle against the fp32 source run directly,
conversion time, latency and size from the bundle's report. The demo digits MLP is one
more model when build/demo-data has it.

    python -m benchmarks.conversion [--models a,b] [--profiles rpi4] [--timeout 900] [--rows rows.jsonl]
    python -m benchmarks.conversion --markdown rows.jsonl [more.jsonl ...]

Environment for ``make bench``: EDGED_BENCH_CORPUS_MODELS, EDGED_BENCH_PROFILES (comma lists),
EDGED_BENCH_CONVERT_TIMEOUT_S (default 900), EDGED_BENCH_RESUME=1 (take conversions already
logged under build/bench-corpus/logs for the same command, e.g. after an interrupted run).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.corpus import CONVERT_TIMEOUT_S, LATENCY_RUNS, PROFILES, WORK, Row, load_rows, run_all_rows

GOAL = 0.90  # issue 13: share of model x profile pairs with a bundle that passes its gate


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


def run() -> dict[str, Any]:
    """Every corpus model x profile; rows also appended to build/bench-corpus/rows-<time>.jsonl."""
    timeout = float(os.environ.get("EDGED_BENCH_CONVERT_TIMEOUT_S", CONVERT_TIMEOUT_S))
    rows_file = WORK / f"rows-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"  rows as they finish: {rows_file}", flush=True)
    rows = run_all_rows(_env_list("EDGED_BENCH_CORPUS_MODELS"), _env_list("EDGED_BENCH_PROFILES"),
                        timeout, rows_file=rows_file, resume=os.environ.get("EDGED_BENCH_RESUME") == "1")
    return {"timeout_s": timeout, "latency_runs": LATENCY_RUNS, "rows": [asdict(r) for r in rows]}


def _secs(row: Row) -> str:
    if row.wall_s is None:
        return "-"
    return f"{row.wall_s:.0f}" + (f" ({row.convert_s:.0f})" if row.convert_s is not None else "")


def _latency(row: Row) -> str:
    """Bundle vs fp32 p50 on the same runtime (the report's latency_same_runtime); else the
    report's source-vs-bundle figures, marked * (fp32 on onnxruntime)."""
    same = row.same_runtime or {}
    chosen, fp32 = same.get("chosen") or {}, same.get("fp32") or {}
    if chosen.get("p50") and fp32.get("p50"):
        text = f"{chosen['p50']:.2f} / {fp32['p50']:.2f} ({chosen['p50'] / fp32['p50']:.2f}x)"
        int8 = same.get("int8_vs_fp32")
        if int8 is not None and chosen.get("label") != "int8":
            text += f"; int8 was {int8:.2f}x"
        return text
    try:
        conv, src = row.latency_ms["converted"]["p50"], row.latency_ms["source"]["p50"]
    except (KeyError, TypeError):
        return "-"
    return f"{conv:.2f} / {src:.2f}* ({conv / src:.2f}x)" if src else f"{conv:.2f} / -"


def _size(row: Row) -> str:
    if row.size_bytes is None:
        return "-"
    src = f"{row.source_bytes / 1024:.0f} → " if row.source_bytes else ""
    return f"{src}{row.size_bytes / 1024:.0f}"


def _cell(text: str, limit: int | None = None) -> str:
    text = text if limit is None or len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _outcome(row: Row) -> str:
    if row.has_bundle:
        what = f"{row.outcome}: {row.runtime} {row.precision}".strip()
        if row.auto:
            what += f" (auto: {row.auto.split(': ', 1)[-1]})"
        return what + (f" ({row.detail})" if row.detail else "")
    return f"{row.outcome}: {row.detail[:100]}" if row.detail else row.outcome


def _gate(row: Row) -> str:
    if not row.has_bundle:
        return "-"
    text = ("pass" if row.http_passed else "FAIL") + ": " + row.http_gate
    return text + (f"; {row.loop}" if row.loop else "")


def summary(rows: list[Row]) -> list[str]:
    pairs = len(rows)
    passed = sum(r.passes for r in rows)
    bundles = sum(r.has_bundle for r in rows)
    as_is = sum(r.passes and r.outcome == "served as is" for r in rows)
    refused = [r for r in rows if not r.has_bundle]
    hints = ("edged bundle create", "--profile", "--task", "pip install", "make install", "--input-shape",
             "--gate-threshold", "--max-accuracy-drop", "--precision")
    named = sum(r.outcome in ("refused", "gate failed", "collapsed") and any(k in r.detail for k in hints)
                for r in refused)
    share = passed / pairs if pairs else 0.0
    slow = [r for r in rows if r.has_bundle and _not_faster(r)]
    told = sum(bool(r.speed_note) for r in slow)
    return [
        f"**{passed} of {pairs} model × profile pairs ({100 * share:.0f} %) yield a bundle that passes a gate fitting "
        f"its output, measured over HTTP against fp32** (goal ≥ {100 * GOAL:.0f} %: "
        f"{'met' if share >= GOAL else 'not met'}); {as_is} of them served as is (`edged bundle create`). "
        f"{bundles} bundles written, {bundles - passed} of them failing the gate over HTTP. "
        f"{len(refused)} pairs without a bundle; the error of {named} of them names what to do instead "
        "(another profile, `edged bundle create`, a `--task`/threshold, an install). "
        f"{len(slow)} written bundles are not faster than fp32 in their report's timing; the report of {told} of "
        "them says so in one line (`speed_note`).",
    ]


def _not_faster(row: Row) -> bool:
    """The bundle's p50 is not below fp32's: on the same runtime, else (*) against the source."""
    same = row.same_runtime or {}
    if same.get("chosen_vs_fp32") is not None and same.get("fp32"):
        return float(same["chosen_vs_fp32"]) >= 1.0 and same.get("chosen", {}).get("label") != "fp32" and \
            "fp32" not in row.precision
    try:
        return row.latency_ms["converted"]["p50"] >= row.latency_ms["source"]["p50"]
    except (KeyError, TypeError):
        return False


def markdown(results: dict[str, Any]) -> str:
    rows = _ordered([Row(**r) for r in results["rows"]])
    lines = [
        "## Conversion: the real-model corpus (`edged convert` per profile)",
        "",
        "Every model of the corpus (`python -m tests.corpus list`: trained models out of pip wheels, data drawn in "
        "their domain) on every profile, as a user runs it: `edged convert MODEL --profile P --calib calib.npz "
        "--holdout holdout.npz --task T` (TFLite profiles from build/torch-venv, for the onnx2torch route; the "
        "onnx2tf route runs its worker in build/tf-venv; the report names the route used), or "
        "`edged bundle create` where `edged convert` says the model is already built or quantized. "
        "**Gate over HTTP**: each bundle served by a real daemon, the held-out samples sent as KServe V2 binary "
        "requests, the task's gate (`converters.metrics`) computed on the answers against the fp32 source run "
        "directly; stateful VAD models also run a state loop (each `stateN` fed back as the next `state`) over a "
        "clip. **s**: the whole command (the report's first conversion step). **p50 ms**: the report's batch-1 "
        "latency of the bundle / fp32 on the same runtime (the report's `latency_same_runtime`, interleaved; on the "
        "onnx2tf route the fp32 TFLite twin on edged's TFLite runtime; * where the report "
        "has only the fp32 source on onnxruntime against the bundle through edged's runtime). **KiB**: fp32 source → bundle model files. "
        "An int8 TFLite that misses the gate falls back to the route's fp16, then fp32 twin (the outcome names "
        "both metrics); a constant scalar input that picks an `If` branch (silero's `sr`) is folded into the "
        "OpenVINO and TFLite bundles, which then have no such input. "
        f"Each conversion capped at {results.get('timeout_s', CONVERT_TIMEOUT_S):.0f} s.",
        "",
        *summary(rows),
        "",
        "| model | profile | outcome | gate over HTTP vs fp32 | s | p50 ms bundle / fp32 same runtime | KiB |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.profile} | {_cell(_outcome(r), 160)} | {_cell(_gate(r))} | {_secs(r)} | "
                     f"{_latency(r)} | {_size(r)} |")
    full = [r for r in rows if not r.has_bundle and len(r.detail) > 100]
    if full:
        lines += ["", "Errors in full:", ""]
        lines += [f"- {r.model} on {r.profile}: `{r.detail}`" for r in full]
    return "\n".join(lines) + "\n"


def _ordered(rows: list[Row]) -> list[Row]:
    """By model (in the order first seen), then profile in PROFILES order."""
    models = list(dict.fromkeys(r.model for r in rows))
    rank = {p: i for i, p in enumerate(PROFILES)}
    return sorted(rows, key=lambda r: (models.index(r.model), rank.get(r.profile, len(rank)), r.profile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma list of corpus models (default: all, plus demo_digits)")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--timeout", type=float, default=CONVERT_TIMEOUT_S, help="seconds per conversion")
    parser.add_argument("--rows", type=Path, default=None, help="append each model's rows to this .jsonl")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--resume", action="store_true",
                        help="take conversions already logged under WORK/logs for the same command")
    parser.add_argument("--markdown", type=Path, nargs="+", help="print the table of these .jsonl row files")
    args = parser.parse_args()
    if args.markdown:
        print(markdown({"rows": [asdict(r) for r in load_rows(args.markdown)], "timeout_s": args.timeout}))
        return
    names = [n for n in args.models.split(",") if n] or None
    profiles = [p for p in args.profiles.split(",") if p]
    rows = run_all_rows(names, profiles, args.timeout, args.work, args.rows, args.resume)
    print(markdown({"rows": [asdict(r) for r in rows], "timeout_s": args.timeout}))


if __name__ == "__main__":
    main()
