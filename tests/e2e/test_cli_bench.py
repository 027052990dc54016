"""`edged bench` as real processes: a real bundle timed in-process (table and JSON),
a real daemon load-tested over HTTP (binary and JSON) and MQTT through a real
mosquitto, and every bad input as one `error:` line with exit code 2. Nothing here
asserts on speed: only what was run, counted and printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from edged.bundle import pack_bundle
from tests.helpers import REPO, free_port, run_concurrently, start_daemon

EDGED = [sys.executable, "-m", "edged.cli"]
FAST = ["--duration", "0.2", "--warmup", "1"]  # bounds only: every row still runs at least once
LATENCY_KEYS = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms"}
INFER_TOKEN = "bench-infer-token-0123456789abcdef"


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("EDGED_TOKEN", "EDGED_URL")}
    return subprocess.run([*EDGED, "bench", *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**environ, "COLUMNS": "100", **(env or {})})


def bench_here(*args: str) -> subprocess.CompletedProcess:
    """The command run in this process (no interpreter start-up), for quick refusals."""
    from typer.testing import CliRunner

    from edged.cli import app

    result = CliRunner().invoke(app, ["bench", *args], env={"EDGED_TOKEN": None, "EDGED_URL": None})
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def ok_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def one_error_line(out: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2 and exactly one line on stderr, `error: ...`, naming ``words``."""
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def table_rows(stdout: str, columns: int) -> list[list[str]]:
    """The table's body rows: lines of exactly ``columns`` numbers ("default" threads too)."""
    def number(word: str) -> bool:
        try:
            float(word)
        except ValueError:
            return word == "default"
        return True

    return [line.split() for line in stdout.splitlines()
            if len(line.split()) == columns and all(number(w) for w in line.split())]


def check_latencies(row: dict) -> None:
    assert LATENCY_KEYS <= set(row)
    assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]


# -- a bundle, in-process ----------------------------------------------------------
def test_bundle_prints_a_table_per_thread_and_batch(demo_bundles):
    out = bench(str(demo_bundles / "digits-onnx"), "--threads", "1,2", "--batch", "1,3", *FAST)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "edged bench digits-onnx 1.0.0" in " ".join(out.stdout.split())
    for column in ("threads", "batch", "p50 ms", "p90 ms", "p99 ms", "runs/s", "items/s", "RSS MiB"):
        assert column in out.stdout, out.stdout
    rows = table_rows(out.stdout, 9)
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("1", "3"), ("2", "1"), ("2", "3")], out.stdout


def test_bundle_json_has_every_row_and_key(demo_bundles):
    doc = ok_json(bench(str(demo_bundles / "digits-onnx"), "--threads", "1,2", "--batch", "1,4", "--json", *FAST))
    assert doc["mode"] == "bundle" and doc["model"] == "digits-onnx" and doc["runtime"] == "onnx"
    assert doc["input_source"] == "samples.npz"
    assert doc["inputs"] == {"input": {"dtype": "float32", "shape": [1, 1, 8, 8]}}
    assert [(r["threads"], r["batch"]) for r in doc["results"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in doc["results"]:
        check_latencies(row)
        assert row["runs"] >= 1 and row["runs_per_s"] > 0 and row["load_s"] > 0
        assert row["items_per_s"] == pytest.approx(row["runs_per_s"] * row["batch"], rel=0.01)
        assert 0 < row["peak_rss_mb"] <= doc["peak_rss_mb"]


def test_bundle_iterations_bound_the_runs(demo_bundles):
    doc = ok_json(bench(str(demo_bundles / "digits-onnx"), "--iterations", "7", "--duration", "600", "--json"))
    assert [r["runs"] for r in doc["results"]] == [7]


def test_quantized_bundle_archive_runs_native_int8(demo_bundles, tmp_path):
    """A .tar.gz works like the directory; a quantized model gets its int8 inputs."""
    archive = pack_bundle(demo_bundles / "digits-tflite", tmp_path / "digits-tflite.tar.gz")
    doc = ok_json(bench(str(archive), "--json", *FAST))
    assert doc["runtime"] == "tflite" and doc["inputs"]["input"]["dtype"] == "int8"
    assert doc["results"][0]["runs"] >= 1


def _fixed_batch_bundle(tmp: Path) -> Path:
    """An ONNX model whose input is fixed at [1, 4], wrapped by `edged bundle create`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp / "fixed.onnx"))
    made = subprocess.run([*EDGED, "bundle", "create", str(tmp / "fixed.onnx"), "--out", str(tmp / "bundles")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert made.returncode == 0, made.stdout + made.stderr
    return tmp / "bundles" / "fixed"


def test_fixed_batch_refuses_other_batch_sizes(tmp_path):
    bundle = _fixed_batch_bundle(tmp_path)
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float64))  # --input as .npy, cast to the input's float32
    refused, plain, from_file = run_concurrently([  # three independent runs side by side
        partial(bench, str(bundle), "--batch", "1,4"),
        partial(bench, str(bundle), "--json", *FAST),
        partial(bench, str(bundle), "--input", str(tmp_path / "x.npy"), "--json", *FAST),
    ])
    one_error_line(refused, "--batch 4", "fixed", "x float32[1, 4]")
    doc = ok_json(plain)
    assert [r["batch"] for r in doc["results"]] == [1]
    doc = ok_json(from_file)
    assert doc["input_source"].endswith("x.npy") and doc["inputs"]["x"]["dtype"] == "float32"


@pytest.mark.parametrize("args, words", [
    (["/no/such/bundle"], ["/no/such/bundle", "--url"]),
    (["{bundles}/digits-onnx", "--threads", "one"], ["--threads"]),
    (["{bundles}/digits-onnx", "--batch", "0"], ["--batch", "1 or more"]),
    (["{bundles}/digits-onnx", "--concurrency", "4"], ["--concurrency", "--url"]),
    (["{bundles}/digits-onnx", "--input", "/no/such.npz"], ["--input", "no such file"]),
    (["--url", "http://127.0.0.1:8080", "digits-onnx", "--threads", "2"], ["--threads"]),
    (["--url", "ftp://host", "digits-onnx"], ["--url", "http://HOST:PORT"]),
    (["--url", "http://127.0.0.1:8080", "digits-onnx", "--protocol", "grpc"], ["--protocol grpc"]),
], ids=["unknown-bundle", "bad-threads", "zero-batch", "concurrency-for-bundle", "missing-input",
        "threads-for-daemon", "bad-url", "bad-protocol"])
def test_bad_input_is_one_error_line(demo_bundles, args, words):
    one_error_line(bench_here(*[a.format(bundles=demo_bundles) for a in args]), *words)


# -- a daemon over HTTP -------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(demo_bundles, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("bench"), demo_bundles)
    yield proc
    proc.stop()


def test_url_prints_a_table_per_level(daemon):
    out = bench("--url", daemon.url, "digits-onnx", "--concurrency", "1,3", *FAST)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"edged bench digits-onnx 1.0.0 over http-binary at {daemon.url}" in " ".join(out.stdout.split())
    for column in ("clients", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"):
        assert column in out.stdout, out.stdout
    levels = table_rows(out.stdout, 7)
    assert [(r[0], r[2]) for r in levels] == [("1", "0"), ("3", "0")], out.stdout  # clients, errors


@pytest.mark.parametrize("protocol, model", [("http-json", "digits-tflite"), ("http-binary", "digits-openvino")])
def test_url_json_counts_every_level(daemon, protocol, model):
    doc = ok_json(bench("--url", daemon.url, model, "--protocol", protocol, "--concurrency", "1,2,4", "--json", *FAST))
    assert doc["mode"] == "http" and doc["protocol"] == protocol and doc["model"] == model
    assert doc["version"] == "1.0.0" and doc["input_source"] == "random, shaped by the model's metadata"
    assert [r["concurrency"] for r in doc["results"]] == [1, 2, 4]
    for row in doc["results"]:
        assert row["errors"] == 0 and row["first_error"] is None, row
        assert row["requests"] >= 1 and row["req_per_s"] > 0
        check_latencies(row)


def test_url_takes_input_from_a_file(daemon, demo_data):
    with np.load(demo_data / "digits_test.npz") as data:
        x = data["x"][:2].astype(np.float32).reshape(2, 1, 8, 8)
    path = Path(daemon.config).parent / "two.npz"
    np.savez(path, input=x)
    doc = ok_json(bench("--url", daemon.url, "digits-onnx", "--input", str(path), "--concurrency", "2", "--json", *FAST))
    assert doc["inputs"] == {"input": {"dtype": "float32", "shape": [2, 1, 8, 8]}}
    assert doc["results"][0]["errors"] == 0


def test_url_errors_are_one_line(daemon):
    one_error_line(bench_here("--url", daemon.url, "no-such-model"), "no-such-model", "404")
    one_error_line(bench_here("--url", f"http://127.0.0.1:{free_port()}", "digits-onnx"), "cannot reach")
    bad = Path(daemon.config).parent / "bad.npz"
    np.savez(bad, input=np.zeros((1, 3), np.float32))  # the wrong shape: the daemon refuses the first request
    one_error_line(bench_here("--url", daemon.url, "digits-onnx", "--input", str(bad)), "first request failed", "400")


def test_url_with_tokens_needs_edged_token(demo_bundles, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"infer {INFER_TOKEN}\n")
    tokens.chmod(0o600)
    proc = start_daemon(tmp_path / "d", demo_bundles,
                        env={"EDGED_HTTP_TOKENS_FILE": str(tokens), "EDGED_LOAD": "digits-onnx"})
    try:
        unauthorized, authorized = run_concurrently([
            partial(bench, "--url", proc.url, "digits-onnx"),
            partial(bench, "--url", proc.url, "digits-onnx", "--concurrency", "1", "--json", *FAST,
                    env={"EDGED_TOKEN": INFER_TOKEN}),
        ])
        one_error_line(unauthorized, "401")
        doc = ok_json(authorized)
        assert doc["results"][0]["errors"] == 0 and doc["results"][0]["requests"] >= 1
    finally:
        proc.stop()


# -- a daemon over MQTT -------------------------------------------------------------
@pytest.fixture(scope="module")
def mqtt_daemon(demo_bundles, mqtt_broker, tmp_path_factory):
    toml = f'device_id = "bench-dev"\n[mqtt]\nenabled = true\nport = {mqtt_broker.port}\nqos = 0\n'
    proc = start_daemon(tmp_path_factory.mktemp("bench-mqtt"), demo_bundles, toml)
    yield proc
    proc.stop()


def test_mqtt_finds_the_device_and_counts_every_level(mqtt_daemon, mqtt_broker):
    doc = ok_json(bench("--protocol", "mqtt", "--mqtt-port", str(mqtt_broker.port), "--url", mqtt_daemon.url,
                        "digits-onnx", "--concurrency", "1,4", "--qos", "0", "--json", *FAST))
    assert doc["mode"] == "mqtt" and doc["device"] == "bench-dev"
    assert doc["topic"] == "edged/bench-dev/infer/digits-onnx"
    assert [r["concurrency"] for r in doc["results"]] == [1, 4]
    for row in doc["results"]:
        assert row["errors"] == 0 and row["requests"] >= 1, row
        check_latencies(row)


def test_mqtt_table_with_an_input_file_and_no_http(mqtt_daemon, mqtt_broker, tmp_path):
    np.save(tmp_path / "x.npy", np.full((1, 1, 8, 8), 0.5, np.float32))
    out = bench("--protocol", "mqtt", "--mqtt-port", str(mqtt_broker.port), "--device", "bench-dev",
                "digits-tflite", "--input", str(tmp_path / "x.npy"), "--concurrency", "2", *FAST)
    assert out.returncode == 0, out.stdout + out.stderr
    words = " ".join(out.stdout.split())
    assert f"over mqtt QoS 1 at bench-dev via 127.0.0.1:{mqtt_broker.port}" in words, out.stdout
    levels = table_rows(out.stdout, 7)
    assert len(levels) == 1 and levels[0][0] == "2" and levels[0][2] == "0", out.stdout  # clients, errors


def test_mqtt_errors_are_one_line(mqtt_daemon, mqtt_broker, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    port = str(mqtt_broker.port)
    unknown, no_device, failed, unreachable = run_concurrently([  # each with its own MQTT client and reply topic
        partial(bench, "--protocol", "mqtt", "--mqtt-port", port, "--url", mqtt_daemon.url, "no-such-model"),
        partial(bench, "--protocol", "mqtt", "--mqtt-port", port, "--input", str(tmp_path / "x.npy"), "no-such-model"),
        partial(bench, "--protocol", "mqtt", "--mqtt-port", port, "--device", "bench-dev",
                "--input", str(tmp_path / "x.npy"), "no-such-model"),
        partial(bench, "--protocol", "mqtt", "--mqtt-port", str(free_port()), "--input", str(tmp_path / "x.npy"),
                "digits-onnx"),
    ], workers=4)
    one_error_line(unknown, "no-such-model")
    one_error_line(no_device, "no online device", "bench-dev")
    one_error_line(failed, "first request failed")
    one_error_line(unreachable, "cannot reach")
