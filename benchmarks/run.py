"""`make bench`: run every benchmark section in one process, write
benchmarks/results/latest.json and BENCHMARKS.md.

EDGED_BENCH_SECTIONS=core,peers runs only those sections. By default it
writes build/bench/partial.json and partial.md; with EDGED_BENCH_UPDATE=1 it
replaces those sections in BENCHMARKS.md in place, each labelled with the
time of its own run, and keeps the other sections as they were."""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("core", "peers", "batching", "mqtt", "ota", "conversion")


def _blocks(markdown: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a BENCHMARKS.md into its preamble lines and (heading, text) blocks per `## ` heading."""
    preamble: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    for line in markdown.splitlines():
        if line.startswith("## "):
            blocks.append((line, [line]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            preamble.append(line)
    return preamble, [(heading, "\n".join(lines).rstrip() + "\n") for heading, lines in blocks]


def update_sections(existing: str, fresh: dict[str, str], started: str, command: str = "make bench") -> str:
    """Replace (or add, in SECTIONS order) the blocks of ``fresh`` {section: markdown} in ``existing``."""
    preamble, blocks = _blocks(existing)
    by_heading = {heading: text for heading, text in blocks}
    order = [heading for heading, _ in blocks]
    for section in SECTIONS:
        if section not in fresh:
            continue
        text = fresh[section].rstrip() + "\n"
        heading = text.splitlines()[0]
        lines = text.splitlines()
        text = "\n".join([lines[0], "", f"> This section was measured {started} by `{command}`.", *lines[1:]]) + "\n"
        if heading not in by_heading:
            order.append(heading)
        by_heading[heading] = text
    return "\n".join(preamble).rstrip() + "\n\n" + "\n".join(by_heading[h] for h in order)


def main() -> None:
    results: dict = {"machine": {"python": platform.python_version(), "arch": platform.machine(),
                                 "cpus": os.cpu_count()},
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = ["# Benchmarks", "", f"Measured {results['started']} on {results['machine']['arch']}, "
             f"{results['machine']['cpus']} CPUs, Python {results['machine']['python']}, by `make bench` in one run. "
             "Compare ratios within this file; absolute numbers vary between machines.", ""]
    only = [s.strip() for s in os.environ.get("EDGED_BENCH_SECTIONS", "").split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: EDGED_BENCH_SECTIONS: unknown section(s) {', '.join(unknown)}; "
                         f"known: {', '.join(SECTIONS)}")
    fresh: dict[str, str] = {}
    for section in only or SECTIONS:
        try:
            module = importlib.import_module(f"benchmarks.{section}")
        except ModuleNotFoundError as exc:
            if exc.name == f"benchmarks.{section}":
                continue
            raise
        print(f"== {section}", flush=True)
        results[section] = module.run()
        fresh[section] = module.markdown(results[section])
        parts.append(fresh[section])
    update = bool(only) and os.environ.get("EDGED_BENCH_UPDATE") == "1"
    out = ROOT / ("build/bench/partial.json" if only else "benchmarks/results/latest.json")
    md = ROOT / "BENCHMARKS.md" if update or not only else out.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if update:
        command = f"EDGED_BENCH_SECTIONS={','.join(only)} EDGED_BENCH_UPDATE=1 make bench"
        md.write_text(update_sections(md.read_text(), fresh, results["started"], command))
    else:
        md.write_text("\n".join(parts))
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
