"""Section "mqtt": request/response round trips through a real mosquitto at
QoS 0 and 1 beside HTTP binary for the same model and daemon in the same run,
in interleaved rounds (each with its load average), and the outbox's write and
drain rates.

Both sides use one synchronous requester doing its I/O in the caller's thread,
as tritonclient's HTTP client does: stock paho through its external-loop API
(loop_read, loop_write and loop_misc around the caller's own select), so
publish() writes straight to the socket and the caller reads until the reply is
there. Its requests describe the tensor in Content Type parameters, so replies
carry two properties; a row keeps the user-property form (six in each reply).
A row with paho's usual loop thread (loop_start) shows what its two thread hops
per round trip cost on the client."""

from __future__ import annotations

import json
import os
import select
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import measure
from edged.outbox import Outbox
from edged.transports.mqtt_client import LeanClient
from edged.transports.mqtt_codec import RAW_CONTENT_TYPE as RAW, with_parameters
from tests.brokers import mosquitto
from tests.helpers import DEMO_BUNDLES, free_port, start_daemon

MODEL = "digits-tflite"
SECONDS = 1.0  # per path and round
ROUNDS = 5  # 1 s rounds swing by +-0.1 in the ratio on a loaded 2-core box: the median of 5
TOPIC = f"edged/bench/infer/{MODEL}"
PATHS = (("mqtt_qos0", "MQTT QoS 0"),
         ("mqtt_qos0_user_properties", "MQTT QoS 0, tensor described by user properties"),
         ("mqtt_qos0_lean_client", "MQTT QoS 0, requester on edged's LeanClient"),
         ("mqtt_qos0_loop_thread", "MQTT QoS 0, paho loop thread"),
         ("mqtt_qos1", "MQTT QoS 1"), ("http_binary", "HTTP binary"))


def _client(kind: type[mqtt.Client] = mqtt.Client) -> mqtt.Client:
    return kind(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)


def _request_properties(reply: str, correlation: bytes, user: list[tuple[str, str]]) -> Properties:
    """The tensor described by Content Type parameters (the reply then comes the same
    way: two properties instead of six), or by user properties where ``user`` says
    ``("form", "user")`` first."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply
    props.CorrelationData = correlation
    if user[:1] == [("form", "user")]:
        props.ContentType = RAW
        props.UserProperty = user[1:]
    else:
        props.ContentType = with_parameters(RAW, user)
    return props


class Requester:
    """One synchronous request/response client: publish, then read in this thread until
    the reply with this request's Correlation Data is there. paho's loop() is not used:
    it makes a socket pair whose wake-up byte each publish() writes and the next select
    reads (an extra pass of its loop per request, ~15 us of client CPU here)."""

    def __init__(self, port: int, qos: int, user: list[tuple[str, str]], kind: type[mqtt.Client] = mqtt.Client) -> None:
        self.qos = qos
        self.client = _client(kind)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: setattr(self, "subscribed", True)
        self.subscribed = False
        self.reply: mqtt.MQTTMessage | None = None
        self.count = 0
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.topic = f"bench/replies/{uuid.uuid4().hex}"
        self.client.subscribe(self.topic, qos=qos)
        self._loop_until(lambda: self.subscribed)
        self.props = _request_properties(self.topic, b"", user)  # built once; each request sets its Correlation Data

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.reply = message

    def _loop_until(self, done, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = self.client
        sock = client.socket()
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no MQTT reply in {timeout} s")
            readable, writable, _ = select.select([sock], [sock] if client.want_write() else [], [], 1.0)
            if readable:
                client.loop_read()
            if writable:
                client.loop_write()
            client.loop_misc()

    def call(self, payload: bytes) -> None:
        self.count += 1
        correlation = self.count.to_bytes(8, "big")
        self.props.CorrelationData = correlation
        self.reply = None
        self.client.publish(TOPIC, payload, qos=self.qos, properties=self.props)
        self._loop_until(lambda: self.reply is not None and self.reply.properties.CorrelationData == correlation)

    def close(self) -> None:
        self.client.disconnect()


class ThreadedRequester:
    """The same round trip with paho's loop thread (loop_start): publish hands the
    packet to that thread, whose on_message wakes the caller."""

    def __init__(self, port: int, qos: int, user: list[tuple[str, str]]) -> None:
        self.qos = qos
        self.event = threading.Event()
        self.client = _client()
        self.client.on_message = lambda c, u, m: self.event.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        while not self.client.is_connected():
            time.sleep(0.01)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.topic = f"bench/replies/{uuid.uuid4().hex}"
        self.client.subscribe(self.topic, qos=qos)
        self.props = _request_properties(self.topic, b"x", user)
        time.sleep(0.2)

    def call(self, payload: bytes) -> None:
        self.event.clear()
        self.client.publish(TOPIC, payload, qos=self.qos, properties=self.props)
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


def _wait_online(port: int, device: str, timeout: float = 60.0) -> None:
    """Until the daemon's retained "online" status is there: it publishes it after
    subscribing to its request topics, so a QoS 0 request sent before could find no
    subscriber and be dropped by the broker (a requester would then wait in vain)."""
    online = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            if json.loads(message.payload).get("state") == "online":
                online.set()
        except ValueError:
            pass

    watcher = _client()
    watcher.on_message = on_message
    watcher.connect("127.0.0.1", port)
    watcher.subscribe(f"edged/{device}/status", qos=1)
    watcher.loop_start()
    try:
        if not online.wait(timeout):
            raise TimeoutError(f"the daemon did not say it was online on MQTT within {timeout:g} s")
    finally:
        watcher.loop_stop()
        watcher.disconnect()


def _rounds(broker_port: int, daemon_port: int) -> list[dict]:
    """Each path for SECONDS in each round; the paths' order alternates between rounds."""
    import tritonclient.http as triton

    with np.load(DEMO_BUNDLES / MODEL / "samples.npz") as data:
        x = data["input:input"][:1]
    payload = x.tobytes()
    user = [("dtype", "FP32"), ("shape", "1,1,8,8")]
    local = threading.local()  # tritonclient's gevent client works only in the thread that made it

    def http_call() -> None:
        client = getattr(local, "client", None) or triton.InferenceServerClient(f"127.0.0.1:{daemon_port}")
        local.client = client
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.infer(MODEL, [inp])

    def mqtt_path(make, qos: int):
        def run_it() -> dict:
            requester = make(broker_port, qos, user)
            try:
                return measure(lambda: requester.call(payload), seconds=SECONDS)
            finally:
                requester.close()
        return run_it

    def lean_requester(port: int, qos: int, user: list[tuple[str, str]]) -> Requester:
        return Requester(port, qos, user, LeanClient)

    def user_property_requester(port: int, qos: int, user: list[tuple[str, str]]) -> Requester:
        return Requester(port, qos, [("form", "user"), *user])

    paths = {"mqtt_qos0": mqtt_path(Requester, 0), "mqtt_qos0_user_properties": mqtt_path(user_property_requester, 0),
             "mqtt_qos0_lean_client": mqtt_path(lean_requester, 0),
             "mqtt_qos0_loop_thread": mqtt_path(ThreadedRequester, 0),
             "mqtt_qos1": mqtt_path(Requester, 1), "http_binary": lambda: measure(http_call, seconds=SECONDS)}
    rounds = []
    for index in range(ROUNDS):
        order = list(paths) if index % 2 == 0 else list(paths)[::-1]
        row: dict = {"load_1m": round(os.getloadavg()[0], 2)}
        for key in order:
            row[key] = paths[key]()
        row["qos0_vs_http"] = round(row["mqtt_qos0"]["rps"] / row["http_binary"]["rps"], 2)
        row["qos0_user_properties_vs_http"] = round(row["mqtt_qos0_user_properties"]["rps"] / row["http_binary"]["rps"], 2)
        row["qos0_lean_client_vs_http"] = round(row["mqtt_qos0_lean_client"]["rps"] / row["http_binary"]["rps"], 2)
        rounds.append(row)
    return rounds


def _median_row(rounds: list[dict], key: str) -> dict:
    return {field: round(statistics.median(r[key][field] for r in rounds), 1) for field in ("rps", "p50_us", "p99_us")}


def run() -> dict:
    results: dict = {"model": MODEL, "rounds_of_s": SECONDS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        broker = mosquitto(tmp_path / "broker", free_port()).start()
        toml = f'device_id = "bench"\n[mqtt]\nenabled = true\nport = {broker.port}\nqos = 0\n'
        daemon = start_daemon(tmp_path / "d", DEMO_BUNDLES, extra_toml=toml, env={"EDGED_LOAD": MODEL})
        try:
            _wait_online(broker.port, "bench")
            results["rounds"] = _rounds(broker.port, daemon.port)
        finally:
            daemon.stop()
        results["outbox"] = _outbox_rates(tmp_path)
        results["outbox"]["published_results_per_s_end_to_end"] = _drain_through_broker(tmp_path, broker.port)
        broker.stop()
    for key, _ in PATHS:
        results[key] = _median_row(results["rounds"], key)
    results["qos0_vs_http_throughput"] = statistics.median(r["qos0_vs_http"] for r in results["rounds"])
    results["qos0_user_properties_vs_http_throughput"] = statistics.median(
        r["qos0_user_properties_vs_http"] for r in results["rounds"])
    results["qos0_lean_client_vs_http_throughput"] = statistics.median(
        r["qos0_lean_client_vs_http"] for r in results["rounds"])
    return results


def markdown(results: dict) -> str:
    rounds = results["rounds"]
    lines = [
        "## mqtt",
        "",
        f"Model {results['model']}, batch 1, one synchronous requester each (raw tensor payloads over mosquitto on "
        "loopback; HTTP is tritonclient binary against the same daemon). Both clients do their I/O in the calling "
        "thread; the MQTT requester is stock paho through its external-loop API. Its request describes the tensor in "
        "Content Type parameters (`application/x-edged-tensor; dtype=FP32; shape=\"1,1,8,8\"`), so the reply comes the "
        "same way: Content Type and Correlation Data, two properties. The user-properties row is the same requester "
        "describing the tensor in user properties (`dtype`, `shape`), whose reply carries six properties (Content "
        "Type, Correlation Data, user properties `output`, `dtype`, `shape`, `model_version`); stock paho parses "
        "each at ~10 µs. The LeanClient row is the same requester (Content Type form) on edged's paho subclass "
        "(edged.transports.mqtt_client, which the daemon uses), which parses properties in a few µs. The loop-thread row is stock "
        "paho with loop_start(), which adds two thread hops per round trip on the client. "
        f"{len(rounds)} interleaved rounds of {results['rounds_of_s']} s per path; medians over the rounds.",
        "",
        "| path | req/s | p50 µs | p99 µs |",
        "|---|---|---|---|",
    ]
    for key, label in PATHS:
        r = results[key]
        lines.append(f"| {label} | {r['rps']} | {r['p50_us']} | {r['p99_us']} |")
    o = results["outbox"]
    per_round = ", ".join(f"{r['qos0_vs_http']}× (load {r['load_1m']})" for r in rounds)
    per_round_lean = ", ".join(f"{r['qos0_lean_client_vs_http']}×" for r in rounds)
    per_round_user = ", ".join(f"{r['qos0_user_properties_vs_http']}×" for r in rounds)
    lines += [
        "",
        f"- MQTT QoS 0 throughput / HTTP binary throughput: **{results['qos0_vs_http_throughput']}×** (goal ≥ 0.7×); "
        f"per round: {per_round}",
        f"- The same with the tensor described by user properties: "
        f"**{results['qos0_user_properties_vs_http_throughput']}×**; per round: {per_round_user}",
        f"- The same with the requester on edged's LeanClient: **{results['qos0_lean_client_vs_http_throughput']}×**; "
        f"per round: {per_round_lean}",
        f"- Outbox (SQLite WAL): {o['write_per_s']} writes/s; storage-side drain {o['drain_per_s_storage_only']} rows/s; "
        f"HTTP results published through the outbox and received by a subscriber: {o['published_results_per_s_end_to_end']}/s end to end",
        "",
    ]
    return "\n".join(lines)
