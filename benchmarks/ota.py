"""OTA benchmark: publish-to-active time of a ~10 MB bundle on loopback (real
mosquitto, `edged fleet serve`, one daemon), and inference p99 during a hot
swap against p99 without one, in the same run."""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from benchmarks.common import percentile
from edged.ota.message import device_topic
from tests.brokers import mosquitto, wait_port
from tests.helpers import DEMO_BUNDLES, REPO, free_port, start_daemon
from tests.ota_release import make_big_release, make_keys, make_release, message_for, pack

DEVICE = "bench-ota"
BIG = "big"
SMALL = "digits"
ROUNDS = 3
WINDOW_S = 3.0


def _publish(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def _served(port: int, model: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"/v2/models/{model}")
        body = json.loads(conn.getresponse().read())
        return body.get("parameters", {}).get("version", "")
    finally:
        conn.close()


def _wait_version(port: int, model: str, version: str, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _served(port, model) == version:
            return time.perf_counter()
        time.sleep(0.005)
    raise RuntimeError(f"{model} did not reach {version} in {timeout}s")


def _latencies(port: int, seconds: float, during: callable | None = None) -> list[float]:
    """One keep-alive client sending digits requests for ``seconds``; ``during``
    runs in another thread at the start (e.g. publishing an update)."""
    x = np.random.default_rng(0).integers(0, 17, size=(1, 1, 8, 8)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out: list[float] = []
    worker = threading.Thread(target=during) if during else None
    end = time.perf_counter() + seconds
    if worker:
        worker.start()
    while time.perf_counter() < end:
        start = time.perf_counter()
        conn.request("POST", f"/v2/models/{SMALL}/infer", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"request failed with HTTP {response.status} during the benchmark")
        out.append(time.perf_counter() - start)
    if worker:
        worker.join()
    conn.close()
    return out


def run() -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        keys = make_keys(tmp / "keys")
        served = tmp / "served"
        served.mkdir()
        broker = mosquitto(tmp / "broker", free_port()).start()
        serve_port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "edged.cli", "fleet", "serve", str(served), "--port", str(serve_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )
        wait_port(serve_port)
        base = f"http://127.0.0.1:{serve_port}/"
        models = tmp / "models"
        models.mkdir()
        make_big_release(DEMO_BUNDLES / "digits-onnx", models, BIG, "1.0.0", keys.private, megabytes=11)
        make_release(DEMO_BUNDLES / "digits-onnx", models, SMALL, "1.0.0", keys.private)
        toml = (f'device_id = "{DEVICE}"\nwarmup_runs = 1\n[mqtt]\nenabled = true\nport = {broker.port}\n'
                f'[ota]\nenabled = true\ntrusted_keys_dir = "{keys.trusted_dir}"\nhealth_window_s = 1\n')
        daemon = start_daemon(tmp / "device", models, extra_toml=toml)
        try:
            # 1. publish -> active for a ~10 MB bundle
            times, sizes = [], []
            for round_ in range(ROUNDS):
                version = f"{round_ + 2}.0.0"
                root = make_big_release(DEMO_BUNDLES / "digits-onnx", tmp / "rel", BIG, version, keys.private, megabytes=11)
                archive = pack(root, served)
                sizes.append(archive.stat().st_size)
                payload = message_for(archive, base, root).to_json()
                start = time.perf_counter()
                _publish(broker.port, device_topic("edged", DEVICE, BIG), payload)
                times.append(_wait_version(daemon.port, BIG, version) - start)
            results["publish_to_active_s"] = [round(t, 3) for t in times]
            results["publish_to_active_median_s"] = round(statistics.median(times), 3)
            results["bundle_mb"] = round(statistics.median(sizes) / 2**20, 1)

            # 2. p99 with and without a hot swap of the model being queried
            quiet, swapping = [], []
            for round_ in range(ROUNDS):
                quiet.append(_latencies(daemon.port, WINDOW_S))
                version = f"{round_ + 2}.0.0"
                root = make_release(DEMO_BUNDLES / "digits-openvino" if round_ % 2 == 0 else DEMO_BUNDLES / "digits-onnx",
                                    tmp / "small", SMALL, version, keys.private)
                archive = pack(root, served)
                payload = message_for(archive, base, root).to_json()
                swapping.append(_latencies(
                    daemon.port, WINDOW_S,
                    during=lambda p=payload: _publish(broker.port, device_topic("edged", DEVICE, SMALL), p),
                ))
                if _served(daemon.port, SMALL) != version:
                    _wait_version(daemon.port, SMALL, version)
                    raise RuntimeError(f"the swap to {version} did not happen inside the {WINDOW_S}s window")
            all_quiet = [v for run_ in quiet for v in run_]
            all_swap = [v for run_ in swapping for v in run_]
            results["requests_quiet"], results["requests_swap"] = len(all_quiet), len(all_swap)
            results["p50_quiet_us"] = round(percentile(all_quiet, 50) * 1e6, 1)
            results["p99_quiet_us"] = round(percentile(all_quiet, 99) * 1e6, 1)
            results["p50_swap_us"] = round(percentile(all_swap, 50) * 1e6, 1)
            results["p99_swap_us"] = round(percentile(all_swap, 99) * 1e6, 1)
            results["max_swap_us"] = round(max(all_swap) * 1e6, 1)
            results["p99_ratio"] = round(results["p99_swap_us"] / results["p99_quiet_us"], 2)
        finally:
            daemon.stop()
            server.terminate()
            server.wait(10)
            broker.stop()
    return results


def markdown(r: dict) -> str:
    return "\n".join([
        "## ota",
        "",
        "One daemon, real mosquitto and `edged fleet serve` on loopback. Publish → active is the time from the "
        "retained MQTT publish until `/v2/models/{model}` reports the new version (download, sha256 and Ed25519 "
        "checks, unpack, load, warm-up, self-test, swap).",
        "",
        f"- Publish → active for a {r['bundle_mb']} MB bundle: median **{r['publish_to_active_median_s']} s** "
        f"(runs: {', '.join(str(t) for t in r['publish_to_active_s'])} s)",
        "",
        f"Inference latency of the model being swapped, one keep-alive JSON client, {ROUNDS} windows of {WINDOW_S:.0f} s "
        "each, with and without one hot swap (v1 → v2, different runtimes) inside the window:",
        "",
        "| window | requests | p50 µs | p99 µs |",
        "|---|---|---|---|",
        f"| no swap | {r['requests_quiet']} | {r['p50_quiet_us']} | {r['p99_quiet_us']} |",
        f"| with a swap | {r['requests_swap']} | {r['p50_swap_us']} | {r['p99_swap_us']} |",
        "",
        f"- p99 during a swap / p99 without: **{r['p99_ratio']}×** (slowest request during a swap: {r['max_swap_us']} µs); "
        "no request failed (the benchmark stops on any non-200).",
        "",
    ])
