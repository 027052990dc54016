"""Section "batching": dynamic batching off vs on at 16 concurrent clients.

Two daemons run side by side with the same bundles and settings, one with
``[models.<name>] max_batch_size`` set (a fresh one for each row of ROWS). Rounds alternate between them (off/on,
then on/off) so load on the machine hits both alike; the ratio of their req/s is
the figure. The CNN is built here with random weights: only throughput is measured.
"""

from __future__ import annotations

import http.client
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import binary_call, measure
from tests.helpers import DEMO_BUNDLES, REPO, start_daemon

CLIENTS = 16
ROUNDS = 5
SECONDS = 3.0
ROWS = (  # (model, max_batch_size, max_queue_delay_us): one row each, against the same daemon without batching
    ("digits-onnx", 16, 500),
    ("digits-onnx", 16, 0),  # no delay: requests join the batches that form while the loop is busy
    ("cnn224", 16, 2000),
)
CNN_SHAPE = (3, 224, 224)


def write_cnn_bundle(dest: Path, name: str = "cnn224", seed: int = 0) -> None:
    """A small 224x224 CNN (3 strided convolutions, global pool, dense) with a
    dynamic batch dim, random weights, as an onnx bundle."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edged.bundle import Manifest, write_bundle
    from edged.tensors import TensorSpec

    rng = np.random.RandomState(seed)
    nodes, weights, channels, previous = [], [], 3, "input"
    for i, width in enumerate((16, 32, 64)):
        w = (rng.randn(width, channels, 3, 3) * np.sqrt(2.0 / (9 * channels))).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        channels, previous = width, f"r{i}"
    weights += [numpy_helper.from_array((rng.randn(channels, 10) * 0.1).astype(np.float32), "fc"),
                numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"])]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *CNN_SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = dest.parent / f".{name}.onnx"
    onnx.save(model, str(source))
    manifest = Manifest(name=name, version="1.0.0", runtime="onnx", model_file="model.onnx",
                        inputs=[TensorSpec("input", "float32", (-1, *CNN_SHAPE), "NCHW")],
                        outputs=[TensorSpec("logits", "float32", (-1, 10), "NC")])
    sample = rng.rand(1, *CNN_SHAPE).astype(np.float32)
    write_bundle(dest, manifest, {"model.onnx": source}, {"input": sample}, {})
    source.unlink()


def models_toml(name: str, size: int, delay: int) -> str:
    """The [models.<name>] table turning batching on."""
    return f"[models.{name}]\nmax_batch_size = {size}\nmax_queue_delay_us = {delay}\n"


def _histogram(text: str, metric: str, model: str) -> tuple[float, float]:
    """(sum, count) of a histogram's series for ``model`` in a /metrics exposition."""
    values = {}
    for suffix in ("_sum", "_count"):
        pattern = rf'^{metric}{suffix}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$'
        values[suffix] = sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))
    return values["_sum"], values["_count"]


def _metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (its threads included)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(call, pid: int, seconds: float) -> dict:
    """measure() plus the daemon's CPU µs per request: steadier than req/s on a loaded machine."""
    before = _cpu_s(pid)
    result = measure(call, seconds=seconds, concurrency=CLIENTS)
    result["cpu_us"] = round((_cpu_s(pid) - before) / max(1, result["n"]) * 1e6, 1)
    return result


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(rows: list[tuple[str, int, int]] | None = None, rounds: int = ROUNDS, seconds: float = SECONDS,
        build_demo: bool = True) -> dict:
    """Each row (default ROWS) batching off vs on: one daemon without batching for all rows,
    and one with the row's settings started for it."""
    settings = rows or ROWS
    if build_demo:
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_demo.py"), "--out", str(DEMO_BUNDLES)], check=True)
    results: dict = {"clients": CLIENTS, "rounds": rounds, "seconds": seconds, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        models.mkdir()
        (models / "digits-onnx").symlink_to(DEMO_BUNDLES / "digits-onnx")
        write_cnn_bundle(models / "cnn224")
        extra = 'load = ["digits-onnx", "cnn224"]\n'
        off = start_daemon(root / "off", models, extra)
        daemons = {"off": off}
        try:
            for index, (name, size, delay) in enumerate(settings):
                daemons["on"] = start_daemon(root / f"on{index}", models, extra + models_toml(name, size, delay))
                shape = (1, 1, 8, 8) if name == "digits-onnx" else (1, *CNN_SHAPE)
                x = np.random.RandomState(0).rand(*shape).astype(np.float32)
                calls = {mode: binary_call(d.port, name, x) for mode, d in daemons.items()}
                before = {mode: _metrics(d.port) for mode, d in daemons.items()}
                timed = []
                for i in range(rounds):
                    order = ("off", "on") if i % 2 == 0 else ("on", "off")
                    row = {"load": _load()}
                    for mode in order:
                        row[mode] = _timed(calls[mode], daemons[mode].proc.pid, seconds)
                    timed.append(row)
                row = _summary(name, size, delay, timed, before["on"], _metrics(daemons["on"].port))
                row.update(_ceiling(models / name, size, row["cpu_us_off"]))
                results["rows"].append(row)
                daemons.pop("on").stop()
        finally:
            for daemon in daemons.values():
                daemon.stop()
    return results


def _ceiling(bundle: Path, size: int, cpu_us_off: float) -> dict:
    """What batching can win at most here: the bare runtime call per row at batch 1 and at
    ``size`` (in-process, 1 thread, as `edged bench` times it). Batching saves at most their
    difference per request, out of the daemon's CPU per request without batching."""
    from edged.bench.local import LocalOptions, bench_bundle

    rows = bench_bundle(bundle, LocalOptions(threads=(1,), batches=(1, size), duration_s=2.0))["results"]
    one, full = (next(r["p50_ms"] * 1000.0 for r in rows if r["batch"] == b) for b in (1, size))
    saved = one - full / size
    return {"bare_row_us_1": round(one, 1), "bare_row_us_full": round(full / size, 1),
            "ceiling": round(cpu_us_off / max(cpu_us_off - saved, 1e-9), 2)}


def _summary(name: str, size: int, delay: int, rounds: list[dict], before: str, after: str) -> dict:
    """Ratios per round, median ratio, and the batch sizes and run time the daemon saw."""
    ratios = [r["on"]["rps"] / r["off"]["rps"] for r in rounds]
    rows_sum, batches = np.subtract(_histogram(after, "edged_batch_size", name), _histogram(before, "edged_batch_size", name))
    run_sum, runs = np.subtract(_histogram(after, "edged_inference_duration_seconds", name),
                                _histogram(before, "edged_inference_duration_seconds", name))
    batch_run_us = run_sum / runs * 1e6 if runs else float("nan")  # per request: the run of its batch
    p99_on = statistics.median(r["on"]["p99_us"] for r in rounds)
    p99_off = statistics.median(r["off"]["p99_us"] for r in rounds)
    return {
        "model": name, "max_batch_size": size, "max_queue_delay_us": delay, "rounds": rounds,
        "ratios": [round(r, 2) for r in ratios], "ratio": round(statistics.median(ratios), 2),
        "rps_off": round(statistics.median(r["off"]["rps"] for r in rounds), 1),
        "rps_on": round(statistics.median(r["on"]["rps"] for r in rounds), 1),
        "p99_off_us": round(p99_off, 1), "p99_on_us": round(p99_on, 1),
        "cpu_us_off": round(statistics.median(r["off"]["cpu_us"] for r in rounds), 1),
        "cpu_us_on": round(statistics.median(r["on"]["cpu_us"] for r in rounds), 1),
        "mean_batch_rows": round(rows_sum / batches, 2) if batches else 0.0,
        "batch_run_us": round(batch_run_us, 1),
        "p99_added_us": round(p99_on - p99_off, 1),
        "p99_bound_us": round(delay + batch_run_us, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        "## batching",
        "",
        f"Dynamic batching off vs on: a daemon without batching and, for each row, one with the row's settings, "
        f"side by side (same bundles, `threads = 1`, default `max_concurrency`), {results['clients']} client threads with keep-alive binary requests of one "
        f"row each, {results['rounds']} interleaved rounds of {results['seconds']:g} s (order alternating). "
        "`cnn224` is a 3-convolution 224×224 CNN built by the benchmark with random weights (only "
        "throughput is measured). Ratio: median of the per-round req/s ratios.",
        "",
        "| model | max_batch_size / max_queue_delay_us | req/s off | req/s on | ratio (rounds) | daemon CPU µs/req off / on | "
        "mean batch rows | batch run µs | p99 off / on µs | p99 added vs bound (delay + batch run) µs | "
        "bare runtime µs/row at batch 1 / full | ceiling | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        name = r["model"]
        loads = " / ".join(f"{row['load']:.1f}" for row in r["rounds"])
        lines.append(
            f"| {name} | {r['max_batch_size']} / {r['max_queue_delay_us']} | {r['rps_off']} | {r['rps_on']} | "
            f"{r['ratio']}× ({', '.join(map(str, r['ratios']))}) | {r['cpu_us_off']} / {r['cpu_us_on']} | "
            f"{r['mean_batch_rows']} | {r['batch_run_us']} | "
            f"{r['p99_off_us']} / {r['p99_on_us']} | {r['p99_added_us']} vs {r['p99_bound_us']} | "
            f"{r.get('bare_row_us_1', '')} / {r.get('bare_row_us_full', '')} | {r.get('ceiling', '')}× | {loads} |"
        )
    lines += [
        "",
        "- Goals at 16 clients: ≥ 2× for digits, ≥ 1.3× for the CNN; p99 bounded by max_queue_delay_us plus one "
        "batch's run time (batch run: mean over requests of their batch's runtime call, from the daemon's "
        "`edged_inference_duration_seconds`). Daemon CPU µs/req: the daemon process's user + system CPU "
        "time over the requests it answered in a round (median of rounds); on a shared machine it moves less "
        "than req/s does.",
        "- Ceiling: the most batching could win on this machine, were everything but the runtime call free of "
        "cost to batch. The bare runtime call (in-process, 1 thread, `edged bench` with `--batch 1,N`) per row "
        "at batch 1 and at max_batch_size gives the time batching saves per request; the ceiling is the "
        "daemon's CPU µs per request without batching over that minus the saving. A goal above the ceiling "
        "cannot be met by batching here: the rest of the request (HTTP, decode, encode) is paid per request "
        "either way.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.batching [model=size/delay_us ...]
    chosen = [(a.split("=")[0], *map(int, a.split("=")[1].split("/"))) for a in sys.argv[1:]]
    print(markdown(run(chosen or None, build_demo=not chosen)))
