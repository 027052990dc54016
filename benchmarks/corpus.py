"""The real-model corpus through ``edged convert`` per profile, as a user runs it.

For every corpus model (``tests.corpus``) and profile one row: ``edged convert`` as a
process (the TFLite profiles with build/torch-venv's Python, where the onnx2torch and,
when built, onnx2tf routes live), with the model's ``--task`` from the catalogue and its
calibration / held-out data drawn in its domain. A model that
``edged convert`` refuses because it is already built or quantized goes through
``edged bundle create`` ("served as is"). Every bundle is then served by a real daemon and
the held-out samples are sent over HTTP; the task's gate is computed on what came back
against the fp32 source run directly. Stateful models also run a state loop over a clip.

No ``--input-shape`` is passed: the data's shapes fix the dynamic dims, as a user with
calibration data gets them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.helpers import REPO

PROFILES = ("generic-x86", "intel-x86", "rpi4")
CONVERT_TIMEOUT_S = 900.0
CREATE_TIMEOUT_S = 300.0
LATENCY_RUNS = 30
N_CALIB, N_HOLDOUT, N_HOLDOUT_CLASSIFY = 32, 16, 64
WORK = REPO / "build" / "bench-corpus"
TORCH_PYTHON = REPO / "build" / "torch-venv" / "bin" / "python"
DEMO_SOURCE = REPO / "build" / "demo-data" / "digits_fp32.onnx"
DEMO_DATA = REPO / "build" / "demo-data" / "digits_test.npz"


@dataclass
class BenchModel:
    """One model of the benchmark: a corpus entry, or the demo digits MLP."""

    name: str
    path: Path
    format: str
    task: str
    calib: Path | None = None
    holdout: Path | None = None


@dataclass
class Row:
    model: str
    profile: str
    outcome: str  # written, served as is, refused, gate failed, collapsed, timeout, crashed, bundle create failed
    detail: str = ""  # the error line, or notes
    runtime: str = ""
    precision: str = ""
    wall_s: float | None = None  # the whole command
    convert_s: float | None = None  # the report's conversion step
    latency_ms: dict[str, Any] = field(default_factory=dict)
    latency_setup: str = ""
    same_runtime: dict[str, Any] = field(default_factory=dict)  # the report's latency_same_runtime
    auto: str = ""  # precision auto: what was chosen and why
    speed_note: str = ""  # the report's line when the bundle is not faster than fp32
    size_bytes: int | None = None
    source_bytes: int | None = None
    report_gate: str = ""
    http_gate: str = ""  # the task's gate over HTTP against fp32
    http_passed: bool | None = None
    loop: str = ""  # stateful models: the state loop over HTTP against fp32
    bundle: str = ""

    @property
    def has_bundle(self) -> bool:
        return bool(self.bundle)

    @property
    def passes(self) -> bool:
        return self.has_bundle and bool(self.http_passed)


def bench_models(names: list[str] | None = None) -> list[BenchModel]:
    """The corpus catalogue (fetched into build/corpus on first use), plus the demo digits;
    ``names`` picks some, in the order given."""
    from tests.corpus import models

    every = {m.name: m for m in models.CATALOGUE}
    chosen = []
    for name in names or [*every, "demo_digits"]:
        if name == "demo_digits":
            if _demo_ready():
                chosen.append(BenchModel(name, DEMO_SOURCE, "onnx", "classify", DEMO_DATA, DEMO_DATA))
            continue
        m = models.get(name)  # KeyError naming the known models
        chosen.append(BenchModel(m.name, m.path(), m.format, m.task))
    return chosen


def _demo_ready() -> bool:
    if not DEMO_SOURCE.is_file() or not DEMO_DATA.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_demo.py")], cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    return DEMO_SOURCE.is_file() and DEMO_DATA.is_file()


def prepare_data(model: BenchModel, work: Path) -> None:
    """calib.npz / holdout.npz from the corpus generators (cached in build/corpus/data)."""
    if model.calib is not None:
        return
    from tests.corpus import data

    holdout = N_HOLDOUT_CLASSIFY if model.task == "classify" else N_HOLDOUT
    model.calib, model.holdout = data.write_split(model.name, work / "data" / model.name, N_CALIB, holdout)


def python_for(profile: str) -> str:
    """A TFLite profile converts in build/torch-venv (its routes need torch); the rest in this venv.
    The profile file is read here without edged's validation: ``edged convert`` judges it."""
    import tomllib

    path = REPO / "hw-profiles" / f"{profile}.toml"
    try:
        output = tomllib.loads(path.read_text()).get("runtime", {}).get("output")
    except (OSError, ValueError):
        output = None
    return str(TORCH_PYTHON) if output == "tflite" and TORCH_PYTHON.is_file() else sys.executable


@dataclass
class Ran:
    rc: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float


def run_cli(python: str, args: list[str], timeout: float, log: Path) -> Ran:
    """``python -m edged.cli ARGS`` in its own process group, ended on timeout."""
    from tests.helpers import end_process_group

    began = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "edged.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "160"})
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        end_process_group(proc)
        out, err = proc.communicate()
        rc = None
    ran = Ran(rc, out or "", err or "", time.perf_counter() - began)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(args)}\nrc={rc} in {ran.seconds:.1f} s\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}")
    return ran


def error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else ""


OUTCOMES = {0: "written", 2: "refused", 3: "gate failed", 4: "collapsed"}


def read_log(log: Path, args: list[str]) -> Ran | None:
    """The result ``run_cli`` logged for these same ``args``, or None."""
    try:
        head, rest = log.read_text().split("\n--- stdout\n", 1)
        command, status = head.split("\n", 1)
        out, err = rest.split("\n--- stderr\n", 1)
        rc_text, secs = status.removeprefix("rc=").removesuffix(" s").split(" in ")
    except (OSError, ValueError):
        return None
    if command != f"$ {' '.join(args)}":
        return None
    return Ran(None if rc_text == "None" else int(rc_text), out, err, float(secs))


def convert_row(model: BenchModel, profile: str, out: Path, timeout: float, logs: Path,
                resume: bool = False) -> Row:
    """One ``edged convert``; with ``resume``, a finished run logged for the same command
    (and its bundle, if it wrote one) is taken instead of converting again."""
    name = f"{model.name}-{profile}"
    args = ["convert", str(model.path), "--profile", profile, "--calib", str(model.calib), "--holdout",
            str(model.holdout), "--task", model.task, "-o", str(out), "--name", name,
            "--latency-runs", str(LATENCY_RUNS)]
    log = logs / f"{name}.convert.log"
    ran = read_log(log, args) if resume else None
    if ran is not None and ran.rc == 0 and not (out / name / "report.json").is_file():
        ran = None
    if ran is None:
        shutil.rmtree(out / name, ignore_errors=True)  # a bundle from an earlier run is not this run's result
        ran = run_cli(python_for(profile), args, timeout, log)
    if ran.rc is None:
        return Row(model.name, profile, "timeout", f"no result after {timeout:.0f} s", wall_s=round(ran.seconds, 1))
    outcome = OUTCOMES.get(ran.rc, f"crashed (exit {ran.rc})")
    row = Row(model.name, profile, outcome, "" if ran.rc == 0 else error_line(ran.stderr), wall_s=round(ran.seconds, 1))
    if ran.rc == 0:
        _from_report(row, out / name)
    return row


def _from_report(row: Row, bundle_dir: Path) -> None:
    from edged.bundle import open_bundle

    report = json.loads((bundle_dir / "report.json").read_text())
    row.bundle = str(bundle_dir)
    row.runtime, row.precision = report.get("runtime", ""), str(report.get("precision", ""))
    if report.get("route"):
        row.precision += f" via {report['route']}"
    row.convert_s = report.get("conversion_seconds")
    row.latency_ms = report.get("latency_ms", {})
    row.latency_setup = report.get("latency_setup", "")
    row.same_runtime = report.get("latency_same_runtime", {})
    auto = report.get("precision_auto") or {}
    row.auto = f"{auto.get('chosen', '')}: {auto.get('why', '')}" if auto else ""
    row.size_bytes = report.get("size_bytes", {}).get("converted")
    row.source_bytes = report.get("size_bytes", {}).get("source")
    row.report_gate = "; ".join(v["text"] for v in report["gate"]["verdicts"])
    row.detail = "; ".join(report.get("notes", []))
    row.speed_note = report.get("speed_note", "")
    open_bundle(bundle_dir)  # hashes verified, as `edged bundle verify` does


def create_row(model: BenchModel, profile: str, out: Path, refusal: Row, logs: Path) -> Row:
    """``edged bundle create`` with the held-out samples, after ``edged convert`` refused."""
    from edged.bundle import open_bundle

    name = f"{model.name}-{profile}"
    shutil.rmtree(out / name, ignore_errors=True)
    args = ["bundle", "create", str(model.path), "--hw-profile", profile, "--name", name, "-o", str(out),
            "--samples", str(model.holdout)]
    ran = run_cli(sys.executable, args, CREATE_TIMEOUT_S, logs / f"{name}.create.log")
    wall = round((refusal.wall_s or 0) + ran.seconds, 1)
    if ran.rc != 0:
        why = "timed out" if ran.rc is None else error_line(ran.stderr)
        return Row(model.name, profile, "bundle create failed", f"{why} (convert: {refusal.detail})", wall_s=wall)
    bundle = open_bundle(out / name)
    m = bundle.manifest
    notes = [ln.split(":", 1)[1].strip() for ln in ran.stderr.splitlines() if ln.startswith("note:")]
    return Row(model.name, profile, "served as is", "; ".join(notes), runtime=m.runtime,
               precision=str(m.provenance.get("precision", "as is")), wall_s=wall,
               size_bytes=sum(e.size for rel, e in m.files.items() if rel not in ("samples.npz", "report.json")),
               source_bytes=model.path.stat().st_size, bundle=str(bundle.root))


def measure_over_http(model: BenchModel, rows: list[Row], bundles: Path, work: Path) -> None:
    """Serve every bundle of ``rows`` with one daemon; the task's gate on what comes back."""
    from benchmarks.corpus_serve import (LOOPS, Fp32Model, ServedModel, compare, load_feeds, run_all,
                                         speech_chunks, state_loop)
    from tests.helpers import start_daemon

    served = [r for r in rows if r.has_bundle]
    if not served:
        return
    fp32 = Fp32Model(model.path)
    feeds, labels = load_feeds(model.holdout, fp32)
    ref = run_all(fp32.run, feeds)
    loop = LOOPS.get(model.name)
    if loop:
        shapes = {name: feeds[0][name].shape for name, _ in loop.states}
        chunks = speech_chunks(loop)
        ref_loop = state_loop(fp32.run, loop, chunks, shapes)
    daemon = start_daemon(work / "daemon" / model.name, bundles)
    try:
        for row in served:
            name = Path(row.bundle).name
            status, meta = daemon.get(f"/v2/models/{name}/ready")
            if status != 200:
                row.http_gate, row.http_passed = f"not ready over HTTP: {meta}", False
                continue
            try:
                remote = ServedModel(daemon.url, Path(row.bundle), fp32)
                result = compare(model.task, ref, run_all(remote.run, feeds), labels)
                row.http_gate, row.http_passed = result.text(), result.passed
                if loop:
                    got = state_loop(remote.run, loop, chunks, shapes)
                    out = loop.prob_output
                    step = compare(model.task, {out: ref_loop[out]}, {out: got[out]})
                    diff = float(abs(ref_loop[out] - got[out]).max())
                    row.loop = f"{len(chunks)}-step state loop: {step.text()}, max |dp| {diff:.4f}"
                    row.http_passed = row.http_passed and step.passed
            except Exception as exc:  # a served bundle that errors is a result of the row
                row.http_gate, row.http_passed = f"HTTP error: {type(exc).__name__}: {str(exc)[:200]}", False
    finally:
        daemon.stop()


def run_model(model: BenchModel, profiles: list[str], timeout: float, work: Path,
              say: Callable[[str], None], resume: bool = False) -> list[Row]:
    """Every profile's row for one model, measured over HTTP."""
    prepare_data(model, work)
    bundles, logs = work / "bundles" / model.name, work / "logs"
    for stale in bundles.glob("*") if bundles.is_dir() else []:
        if stale.name.removeprefix(f"{model.name}-") not in profiles:  # not this run's: not served
            shutil.rmtree(stale, ignore_errors=True)
    rows = []
    for profile in profiles:
        say(f"{model.name} on {profile}: edged convert ...")
        row = convert_row(model, profile, bundles, timeout, logs, resume)
        if row.outcome == "refused" and "already" in row.detail and "edged bundle create" in row.detail:
            say(f"{model.name} on {profile}: convert refused ({row.detail[:80]}...); edged bundle create ...")
            row = create_row(model, profile, bundles, row, logs)
        say(f"{model.name} on {profile}: {row.outcome} in {row.wall_s} s"
            + (f" ({row.detail[:100]})" if row.detail and not row.has_bundle else ""))
        rows.append(row)
    measure_over_http(model, rows, bundles, work)
    for row in rows:
        if row.has_bundle:
            say(f"{model.name} on {row.profile} over HTTP: {'PASS' if row.passes else 'FAIL'} {row.http_gate}"
                + (f"; {row.loop}" if row.loop else ""))
    return rows


def run_all_rows(names: list[str] | None = None, profiles: list[str] | None = None,
                 timeout: float = CONVERT_TIMEOUT_S, work: Path = WORK,
                 rows_file: Path | None = None, resume: bool = False) -> list[Row]:
    """Every model x profile; each finished model's rows appended to ``rows_file`` (JSON lines)."""
    def say(text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)

    work = work.resolve()  # the daemon runs in its own directory
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for model in bench_models(names):
        try:
            got = run_model(model, list(profiles or PROFILES), timeout, work, say, resume)
        except Exception as exc:  # one model's trouble (data, daemon) leaves the others measured
            say(f"{model.name}: benchmark error {type(exc).__name__}: {exc}")
            got = [Row(model.name, p, "bench error", f"{type(exc).__name__}: {str(exc)[:200]}")
                   for p in profiles or PROFILES]
        rows += got
        if rows_file:
            with rows_file.open("a") as fh:
                for row in got:
                    fh.write(json.dumps(asdict(row)) + "\n")
    return rows


def load_rows(paths: list[Path]) -> list[Row]:
    """Rows from .jsonl files, a later row of the same model x profile replacing an earlier
    one (a rerun); a row whose bundle is still on disk re-reads its report."""
    known = set(Row.__dataclass_fields__)
    rows: dict[tuple[str, str], Row] = {}
    for path in paths:
        if not path.is_file():
            print(f"note: {path}: no rows yet", file=sys.stderr)
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                row = Row(**{k: v for k, v in json.loads(line).items() if k in known})
                if row.bundle and (Path(row.bundle) / "report.json").is_file():
                    _from_report(row, Path(row.bundle))
                rows[(row.model, row.profile)] = row
    return list(rows.values())
