"""Section "mqtt": request/response round trips through a real mosquitto at
QoS 0 and 1 beside HTTP binary for the same model in the same run, and the
outbox's write and drain rates."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import measure, percentile
from edged.outbox import Outbox
from tests.brokers import mosquitto
from tests.helpers import DEMO_BUNDLES, free_port, start_daemon

MODEL = "digits-tflite"
SECONDS = 3.0


class Requester:
    """One paho client doing synchronous request/response round trips."""

    def __init__(self, port: int, qos: int) -> None:
        self.qos = qos
        self.event = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.event.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        while not self.client.is_connected():
            time.sleep(0.01)
        import socket

        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = f"bench/replies/{uuid.uuid4().hex}"
        self.client.subscribe(self.reply, qos=qos)
        time.sleep(0.2)

    def call(self, payload: bytes, user: list[tuple[str, str]]) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply
        props.CorrelationData = b"x"
        props.ContentType = "application/x-edged-tensor"
        props.UserProperty = user
        self.event.clear()
        self.client.publish(f"edged/bench/infer/{MODEL}", payload, qos=self.qos, properties=props)
        if not self.event.wait(10):
            raise TimeoutError("no MQTT response in 10 s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _outbox_rates(tmp: Path, count: int = 2000) -> dict:
    box = Outbox(tmp / "bench-outbox.sqlite")
    payload = json.dumps({"outputs": [{"name": "logits", "data": [0.0] * 10}]}).encode()
    start = time.perf_counter()
    for _ in range(count):
        box.put("edged/bench/result/x", payload)
    write = count / (time.perf_counter() - start)
    start = time.perf_counter()
    while True:
        batch = box.peek(100)
        if not batch:
            break
        for message in batch:
            box.ack(message.id)
    drain = count / (time.perf_counter() - start)
    box.close()
    return {"write_per_s": round(write), "drain_per_s_storage_only": round(drain)}


def _drain_through_broker(tmp: Path, broker_port: int, count: int = 500) -> float:
    """Results queued while offline: time from the broker coming up to the last one received."""
    from tests.helpers import http

    toml = f'device_id = "bench2"\n[mqtt]\nenabled = true\nport = {broker_port}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.2\npublish_http_results = true\n'
    daemon = start_daemon(tmp / "drain", DEMO_BUNDLES, extra_toml=toml, env={"EDGED_LOAD": MODEL})
    try:
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}).encode()
        got = threading.Event()
        seen: set[int] = set()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def on_message(c, u, m) -> None:
            seen.add(json.loads(m.payload)["seq"])
            if len(seen) >= count:
                got.set()

        sub.on_message = on_message
        sub.connect("127.0.0.1", broker_port)
        sub.loop_start()
        sub.subscribe(f"edged/bench2/result/{MODEL}", qos=1)
        time.sleep(0.3)
        start = time.perf_counter()
        for _ in range(count):
            http("POST", daemon.url + f"/v2/models/{MODEL}/infer", body)
        got.wait(60)
        elapsed = time.perf_counter() - start
        sub.disconnect()
        sub.loop_stop()
        return round(len(seen) / elapsed, 1)
    finally:
        daemon.stop()


def run() -> dict:
    import tritonclient.http as triton

    results: dict = {"model": MODEL}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        broker = mosquitto(tmp_path / "broker", free_port()).start()
        toml = f'device_id = "bench"\n[mqtt]\nenabled = true\nport = {broker.port}\nqos = 0\n'
        daemon = start_daemon(tmp_path / "d", DEMO_BUNDLES, extra_toml=toml, env={"EDGED_LOAD": MODEL})
        try:
            with np.load(DEMO_BUNDLES / MODEL / "samples.npz") as data:
                x = data["input:input"][:1]
            user = [("dtype", "FP32"), ("shape", "1,1,8,8")]
            for qos in (0, 1):
                requester = Requester(broker.port, qos)
                results[f"mqtt_qos{qos}"] = measure(lambda: requester.call(x.tobytes(), user), seconds=SECONDS)
                requester.close()
            local = threading.local()

            def http_call() -> None:
                client = getattr(local, "client", None) or triton.InferenceServerClient(f"127.0.0.1:{daemon.port}")
                local.client = client
                inp = triton.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                client.infer(MODEL, [inp])

            results["http_binary"] = measure(http_call, seconds=SECONDS)
        finally:
            daemon.stop()
        results["outbox"] = _outbox_rates(tmp_path)
        results["outbox"]["published_results_per_s_end_to_end"] = _drain_through_broker(tmp_path, broker.port)
        broker.stop()
    results["qos0_vs_http_throughput"] = round(results["mqtt_qos0"]["rps"] / results["http_binary"]["rps"], 2)
    return results


def markdown(results: dict) -> str:
    lines = [
        "## mqtt",
        "",
        f"Model {results['model']}, batch 1, one synchronous requester each (raw tensor payloads over "
        "mosquitto on loopback; HTTP is tritonclient binary against the same daemon).",
        "",
        "| path | req/s | p50 µs | p99 µs |",
        "|---|---|---|---|",
    ]
    for key, label in (("mqtt_qos0", "MQTT QoS 0"), ("mqtt_qos1", "MQTT QoS 1"), ("http_binary", "HTTP binary")):
        r = results[key]
        lines.append(f"| {label} | {r['rps']} | {r['p50_us']} | {r['p99_us']} |")
    o = results["outbox"]
    lines += [
        "",
        f"- MQTT QoS 0 throughput / HTTP binary throughput: **{results['qos0_vs_http_throughput']}×** (goal ≥ 0.7×)",
        f"- Outbox (SQLite WAL): {o['write_per_s']} writes/s; storage-side drain {o['drain_per_s_storage_only']} rows/s; "
        f"HTTP results published through the outbox and received by a subscriber: {o['published_results_per_s_end_to_end']}/s end to end",
        "",
    ]
    return "\n".join(lines)
