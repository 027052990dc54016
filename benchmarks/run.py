"""`make bench`: run every benchmark section in one process, write
benchmarks/results/latest.json and BENCHMARKS.md.

EDGED_BENCH_SECTIONS=conversion,core runs only those sections and writes
build/bench/partial.json and partial.md instead (BENCHMARKS.md keeps
the other sections' numbers from their own run)."""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("core", "conversion", "mqtt", "ota")


def main() -> None:
    results: dict = {"machine": {"python": platform.python_version(), "arch": platform.machine(),
                                 "cpus": __import__("os").cpu_count()},
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = ["# Benchmarks", "", f"Measured {results['started']} on {results['machine']['arch']}, "
             f"{results['machine']['cpus']} CPUs, Python {results['machine']['python']}, by `make bench` in one run. "
             "Compare ratios within this file; absolute numbers vary between machines.", ""]
    only = [s.strip() for s in os.environ.get("EDGED_BENCH_SECTIONS", "").split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: EDGED_BENCH_SECTIONS: unknown section(s) {', '.join(unknown)}; "
                         f"known: {', '.join(SECTIONS)}")
    for section in only or SECTIONS:
        try:
            module = importlib.import_module(f"benchmarks.{section}")
        except ModuleNotFoundError as exc:
            if exc.name == f"benchmarks.{section}":
                continue
            raise
        print(f"== {section}", flush=True)
        results[section] = module.run()
        parts.append(module.markdown(results[section]))
    out = ROOT / ("build/bench/partial.json" if only else "benchmarks/results/latest.json")
    md = out.with_suffix(".md") if only else ROOT / "BENCHMARKS.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text("\n".join(parts))
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
