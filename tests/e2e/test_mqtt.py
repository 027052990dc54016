"""MQTT v5 and Pushgateway against real mosquitto and prometheus-pushgateway
processes on loopback, with the daemon as a real subprocess."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import DEMO_MODELS, DaemonProcess, http, start_daemon

# mosquitto_factory, mqtt_broker and pushgateway_factory come from tests/e2e/conftest.py.
DEVICE = "dev1"


def mqtt_toml(port: int, **extra: object) -> str:
    lines = [f'device_id = "{DEVICE}"', "[mqtt]", "enabled = true", f"port = {port}", "reconnect_min_s = 0.2", "reconnect_max_s = 1.0"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class Peer:
    """A paho MQTT v5 client that collects what it receives."""

    def __init__(self, port: int, client_id: str | None = None, clean: bool = True) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.acked: set[int] = set()
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.acked.add(mid)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=clean, properties=props)
        self.client.loop_start()
        deadline = time.monotonic() + 60  # bounds here are met only when something is broken
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.client.is_connected(), f"no connection to the broker on port {port}"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the broker's SUBACK: later messages on ``topic`` reach us."""
        result, mid = self.client.subscribe(topic, qos=qos)
        deadline = time.monotonic() + 60
        while mid not in self.acked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mid in self.acked, f"no SUBACK for {topic}"

    def get(self, timeout: float = 60.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def request(self, model: str, payload: bytes, content_type: str | None = None, user: list[tuple[str, str]] | None = None, reply: bool = True,
                device: str = DEVICE) -> mqtt.MQTTMessage:
        props = Properties(PacketTypes.PUBLISH)
        if reply:
            props.ResponseTopic = f"replies/{self.client._client_id.decode()}"
            props.CorrelationData = uuid.uuid4().bytes
        if content_type:
            props.ContentType = content_type
        if user:
            props.UserProperty = user
        self.client.publish(f"edged/{device}/infer/{model}", payload, qos=1, properties=props)
        message = self.get()
        if reply:
            assert message.properties.CorrelationData == props.CorrelationData
        return message

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker(mqtt_broker):
    return mqtt_broker


def wait_online(port: int, device: str, daemon) -> None:
    """Wait for the daemon's retained "online" status. It publishes it right after
    subscribing to its request topics, so requests sent afterwards reach it."""
    watcher = Peer(port)
    try:
        watcher.subscribe(f"edged/{device}/status")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.alive():
            try:
                status = json.loads(watcher.get(timeout=1).payload)
            except queue.Empty:
                continue
            if status.get("state") == "online" and status.get("device") == device:
                return
        raise AssertionError(f"{device} never said it was online:\n{daemon.logs()}")
    finally:
        watcher.close()


@pytest.fixture(scope="module")
def daemon(broker, demo_bundles, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("mqttd"), demo_bundles, extra_toml=mqtt_toml(broker.port))
    try:
        wait_online(broker.port, DEVICE, proc)
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def peer(broker, daemon):
    client = Peer(broker.port)
    client.subscribe(f"replies/{client.client._client_id.decode()}")
    yield client
    client.close()


def samples(demo_bundles, model):
    with np.load(demo_bundles / model / "samples.npz") as data:
        return data["input:input"], data["output:logits"]


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_json_request_response(peer, demo_bundles, model):
    x, expected = samples(demo_bundles, model)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    message = peer.request(model, json.dumps(body).encode())
    result = json.loads(message.payload)
    logits = np.asarray(result["outputs"][0]["data"], np.float32).reshape(result["outputs"][0]["shape"])
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_raw_request_response(peer, demo_bundles, model):
    x, expected = samples(demo_bundles, model)
    message = peer.request(model, x.tobytes(), "application/x-edged-tensor", [("dtype", "FP32"), ("shape", ",".join(map(str, x.shape)))])
    assert message.properties.ContentType == "application/x-edged-tensor"
    user = dict(message.properties.UserProperty)
    assert user["dtype"] == "FP32" and user["output"] == "logits"
    logits = np.frombuffer(message.payload, np.float32).reshape([int(d) for d in user["shape"].split(",")])
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


def test_without_response_topic_result_topic_is_used(peer, demo_bundles):
    peer.subscribe(f"edged/{DEVICE}/result/digits-onnx")
    x, _ = samples(demo_bundles, "digits-onnx")
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[0].reshape(-1).tolist()}]}
    message = peer.request("digits-onnx", json.dumps(body).encode(), reply=False)
    assert message.topic == f"edged/{DEVICE}/result/digits-onnx"
    assert json.loads(message.payload)["outputs"][0]["shape"] == [1, 10]


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_raw_request_described_by_content_type_parameters_gets_its_reply_the_same_way(peer, demo_bundles, model):
    """The same tensor and answer as with user properties, each described in Content
    Type parameters (MIME syntax): two properties in the reply instead of six."""
    from email.message import Message

    x, expected = samples(demo_bundles, model)
    shape = ",".join(map(str, x.shape))
    message = peer.request(model, x.tobytes(), f'application/x-edged-tensor; dtype=FP32; shape="{shape}"')
    assert not hasattr(message.properties, "UserProperty")
    header = Message()
    header["content-type"] = message.properties.ContentType
    assert header.get_content_type() == "application/x-edged-tensor"
    assert header.get_param("output") == "logits" and header.get_param("dtype") == "FP32"
    assert header.get_param("model_version")
    logits = np.frombuffer(message.payload, np.float32).reshape([int(d) for d in header.get_param("shape").split(",")])
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    same = peer.request(model, x.tobytes(), "application/x-edged-tensor", [("dtype", "FP32"), ("shape", shape)])
    assert same.payload == message.payload


def test_content_type_parameters_with_user_properties_and_bad_parameters(peer, demo_bundles):
    x, expected = samples(demo_bundles, "digits-onnx")
    # a user property wins over the parameter of its name; unquoted commas are read too
    message = peer.request("digits-onnx", x[:1].tobytes(), "application/x-edged-tensor; dtype=INT8; shape=1,1,8,8",
                           [("dtype", "FP32")])
    assert "output=logits" in message.properties.ContentType and not hasattr(message.properties, "UserProperty")
    np.testing.assert_array_equal(np.frombuffer(message.payload, np.float32).reshape(1, 10).argmax(1), expected[:1].argmax(1))
    for content_type, fragment in (("application/x-edged-tensor; dtype", "parameters must read"),
                                   ("application/x-edged-tensor; dtype=FP32", "'dtype' and 'shape'")):
        message = peer.request("digits-onnx", x[:1].tobytes(), content_type)
        assert dict(message.properties.UserProperty)["error_code"] == "invalid_input"
        assert fragment in json.loads(message.payload)["error"]


@pytest.mark.parametrize(
    "model,payload,content_type,user,code,fragment",
    [
        ("digits-onnx", b"\x00\xffgarbage", None, None, "invalid_input", "malformed JSON"),
        ("digits-onnx", json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}).encode(), None, None, "invalid_input", "expected shape"),
        ("nope", b"{}", None, None, "model_not_found", "unknown model"),
        ("digits-onnx", b"\x00" * 256, "application/x-edged-tensor", [("shape", "1,1,8,8")], "invalid_input", "'dtype' and 'shape'"),
        ("digits-onnx", b"\x00" * 10, "application/x-edged-tensor", [("dtype", "FP32"), ("shape", "1,1,8,8")], "invalid_input", "needs 256 bytes"),
        # Issue 15: these gave "internal" (a ValueError from numpy) instead of a clear error.
        ("digits-onnx", b"", "application/x-edged-tensor", [("dtype", "V0"), ("shape", "1,1,8,8")], "invalid_input", "not a numeric dtype"),
        ("digits-onnx", b"\x00" * 256, "application/x-edged-tensor", [("dtype", "FP32"), ("shape", "-1,-64")], "invalid_input", "negative dimension"),
        # 2**62 + 16 times 4 wraps to 64 elements in int64: the byte count matched, reshape raised.
        ("digits-onnx", b"\x00" * 256, "application/x-edged-tensor", [("dtype", "FP32"), ("shape", "4611686018427387920,4")], "invalid_input", "dimension over"),
    ],
)
def test_bad_payloads_get_errors_and_loop_keeps_serving(peer, demo_bundles, model, payload, content_type, user, code, fragment):
    message = peer.request(model, payload, content_type, user)
    assert dict(message.properties.UserProperty)["error_code"] == code
    assert fragment in json.loads(message.payload)["error"]
    x, _ = samples(demo_bundles, "digits-tflite")
    ok = peer.request("digits-tflite", x[:1].tobytes(), "application/x-edged-tensor", [("dtype", "float32"), ("shape", "1,1,8,8")])
    assert "error_code" not in dict(ok.properties.UserProperty or [])


def test_wildcard_response_topic_gets_an_error_on_the_result_topic(peer, daemon, demo_bundles):
    """A wildcard Response Topic cannot be published to: the request was dropped with
    no reply and no log line. Now the error goes to the device's result topic."""
    peer.subscribe(f"edged/{DEVICE}/result/digits-onnx")
    x, _ = samples(demo_bundles, "digits-onnx")
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[0].reshape(-1).tolist()}]}
    for wildcard in ("replies/#", "replies/+/x"):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = wildcard
        props.CorrelationData = uuid.uuid4().bytes
        peer.client.publish(f"edged/{DEVICE}/infer/digits-onnx", json.dumps(body).encode(), qos=1, properties=props)
        message = peer.get()
        assert message.topic == f"edged/{DEVICE}/result/digits-onnx"
        assert message.properties.CorrelationData == props.CorrelationData
        assert dict(message.properties.UserProperty)["error_code"] == "invalid_input"
        assert "wildcard" in json.loads(message.payload)["error"]
        assert f"Response Topic {wildcard!r} contains a wildcard" in daemon.logs()


def test_model_events_published(broker, daemon):
    watcher = Peer(broker.port)
    try:
        watcher.subscribe(f"edged/{DEVICE}/events")
        assert http("POST", daemon.url + "/v2/repository/models/digits-openvino/unload", b"{}")[0] == 200
        assert http("POST", daemon.url + "/v2/repository/models/digits-openvino/load", b"{}")[0] == 200
        events = [json.loads(watcher.get().payload) for _ in range(2)]
        assert [(e["event"], e["model"]) for e in events] == [("unloaded", "digits-openvino"), ("loaded", "digits-openvino")]
    finally:
        watcher.close()


def test_metrics_pass_promtool(daemon, tmp_path):
    status, body, _ = http("GET", daemon.url + "/metrics")
    assert status == 200
    text = body.decode()
    assert "edged_mqtt_connected 1.0" in text and "edged_outbox_depth" in text and "process_resident_memory_bytes" in text
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_status_online_then_last_will(broker, demo_bundles, tmp_path):
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=mqtt_toml(broker.port).replace(DEVICE, "lwt1"),
                          env={"EDGED_LOAD": "digits-onnx"})
    watcher = Peer(broker.port)
    try:
        watcher.subscribe("edged/lwt1/status")
        deadline = time.monotonic() + 60
        status = {}
        while time.monotonic() < deadline and status.get("state") != "online":
            status = json.loads(watcher.get().payload)
        assert status["state"] == "online"
        assert status["version"] and status["uptime_s"] >= 0
        assert {m["name"]: m["state"] for m in status["models"]}["digits-onnx"] == "READY"
        daemon.stop(signal.SIGKILL)
        message = watcher.get(timeout=60)
        assert json.loads(message.payload)["state"] == "offline"
    finally:
        daemon.stop()
        watcher.close()


def test_offline_results_survive_kill_and_arrive_in_order(demo_bundles, mosquitto_factory, tmp_path):
    """500 HTTP results produced while the broker is down are delivered after a
    kill -9 and restart of the daemon and a restart of the broker: every seq
    arrives, in order of first arrival. Delivery is at least once: a message
    whose PUBACK was lost may come twice, so duplicates are allowed."""
    count = 500
    broker = mosquitto_factory(persistent=True).start()
    port = broker.port
    subscriber = Peer(port, client_id="offline-sub", clean=False)
    subscriber.subscribe(f"edged/{DEVICE}/result/digits-onnx")
    subscriber.close()  # its session (and subscription) persists in the broker
    broker.stop()

    toml = mqtt_toml(port, publish_http_results=True)
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=toml, env={"EDGED_LOAD": "digits-onnx"})
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}).encode()
    for _ in range(count):
        status, _, _ = http("POST", daemon.url + "/v2/models/digits-onnx/infer", body)
        assert status == 200  # HTTP keeps working while the broker is down
    daemon.stop(signal.SIGKILL)
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=toml, env={"EDGED_LOAD": "digits-onnx"}, port=daemon.port)
    try:
        broker.start()
        subscriber = Peer(port, client_id="offline-sub", clean=False)
        seqs: list[int] = []
        deadline = time.monotonic() + 180
        while len(set(seqs)) < count and time.monotonic() < deadline:
            try:
                seqs.append(json.loads(subscriber.get(timeout=5).payload)["seq"])
            except queue.Empty:
                continue
        subscriber.close()
        first_seen = list(dict.fromkeys(seqs))
        assert len(first_seen) == count, f"received {len(first_seen)} of {count}"
        assert first_seen == sorted(first_seen), "results arrived out of order"
        assert first_seen == list(range(first_seen[0], first_seen[0] + count))
    finally:
        daemon.stop()
        broker.stop()


def start_pushing_daemon(tmp_path: Path, demo_bundles: Path, gateway_port: int, device_id: str,
                         extra_push: str = "") -> DaemonProcess:
    """A daemon serving digits-onnx that pushes its metrics to the pushgateway every 0.3 s."""
    toml = (f'device_id = "{device_id}"\n[push]\nenabled = true\nurl = "127.0.0.1:{gateway_port}"\n'
            f'interval_s = 0.3\n{extra_push}')
    return start_daemon(tmp_path / "d", demo_bundles, extra_toml=toml, env={"EDGED_LOAD": "digits-onnx"})


def test_pushgateway_push_and_failures(demo_bundles, pushgateway_factory, tmp_path):
    gateway = pushgateway_factory().start()
    daemon = start_pushing_daemon(tmp_path, demo_bundles, gateway.port, DEVICE, "timeout_s = 1.0\n")
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}).encode()
    try:
        assert http("POST", daemon.url + "/v2/models/digits-onnx/infer", body)[0] == 200
        deadline = time.monotonic() + 60
        found = None
        while time.monotonic() < deadline and not found:
            status, raw, _ = http("GET", f"http://127.0.0.1:{gateway.port}/api/v1/metrics")
            groups = json.loads(raw)["data"] if status == 200 else []
            found = [g for g in groups if g["labels"].get("job") == "edged" and g["labels"].get("instance") == DEVICE
                     and "edged_inference_requests_total" in g]
            time.sleep(0.2)
        assert found, "no edged group in the pushgateway"
        gateway.stop()  # waits for it to exit: the next push (every 0.3 s) fails, and the loop below waits for that
        for _ in range(5):
            assert http("POST", daemon.url + "/v2/models/digits-onnx/infer", body)[0] == 200
        deadline = time.monotonic() + 60
        failures = 0.0
        while time.monotonic() < deadline and failures < 1:
            text = http("GET", daemon.url + "/metrics")[1].decode()
            for line in text.splitlines():
                if line.startswith("edged_push_failures_total "):
                    failures = float(line.split()[1])
            time.sleep(0.2)
        assert failures >= 1
    finally:
        daemon.stop()
        gateway.stop()


def test_raw_shape_as_json_list_and_numpy_dtype_name(peer, demo_bundles):
    x, expected = samples(demo_bundles, "digits-onnx")
    message = peer.request("digits-onnx", x.tobytes(), "application/x-edged-tensor",
                           [("input", "input"), ("dtype", "float32"), ("shape", json.dumps(list(x.shape)))])
    user = dict(message.properties.UserProperty)
    assert "error_code" not in user
    logits = np.frombuffer(message.payload, np.float32).reshape([int(d) for d in user["shape"].split(",")])
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


def test_unknown_input_name_and_dtype_get_errors(peer):
    message = peer.request("digits-onnx", b"\x00" * 256, "application/x-edged-tensor",
                           [("input", "nope"), ("dtype", "FP32"), ("shape", "1,1,8,8")])
    assert dict(message.properties.UserProperty)["error_code"] == "invalid_input"
    message = peer.request("digits-onnx", b"\x00" * 256, "application/x-edged-tensor",
                           [("dtype", "complex-ish"), ("shape", "1,1,8,8")])
    assert dict(message.properties.UserProperty)["error_code"] == "invalid_input"


def test_concurrent_http_results_have_unique_increasing_seq(broker, demo_bundles, tmp_path):
    """Parallel HTTP inferences with publish_http_results: every result is published
    once per seq, and seqs increase in the order the broker delivers them."""
    threads, per_thread = 8, 25
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=mqtt_toml(broker.port, publish_http_results=True).replace(DEVICE, "seq1"),
                          env={"EDGED_LOAD": "digits-onnx"})
    watcher = Peer(broker.port)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}).encode()
    errors: list[int] = []

    def send() -> None:
        for _ in range(per_thread):
            status = http("POST", daemon.url + "/v2/models/digits-onnx/infer", body)[0]
            if status != 200:
                errors.append(status)

    try:
        watcher.subscribe("edged/seq1/result/digits-onnx")
        workers = [threading.Thread(target=send) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors
        seqs = [json.loads(watcher.get().payload)["seq"] for _ in range(threads * per_thread)]
        first_seen = list(dict.fromkeys(seqs))
        assert len(first_seen) == threads * per_thread and first_seen == sorted(first_seen)
        # Each result is committed to the outbox (an fsync) before its answer: never on the event loop.
        assert metric(daemon, "edged_http_inline_requests_total") == 0.0
    finally:
        daemon.stop()
        watcher.close()


def metric(daemon, name: str) -> float | None:
    for line in http("GET", daemon.url + "/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def wait_metric(daemon, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(daemon, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value} (is {metric(daemon, name)})"
        time.sleep(0.1)


def test_broker_restart_reconnects_and_drains_events(mosquitto_factory, demo_bundles, tmp_path):
    """The connection gauge follows the broker, the reconnect counter rises, and
    model events produced while the broker is down arrive after it is back."""
    broker = mosquitto_factory(persistent=True).start()
    watcher = Peer(broker.port, client_id="rc1-watcher", clean=False)
    watcher.subscribe("edged/rc1/events")
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=mqtt_toml(broker.port).replace(DEVICE, "rc1"),
                          env={"EDGED_LOAD": "digits-onnx"})
    try:
        wait_metric(daemon, "edged_mqtt_connected", 1.0)
        while (event := json.loads(watcher.get().payload))["model"] != "digits-onnx":
            pass
        assert event["event"] == "loaded"
        watcher.close()  # its session persists in the broker
        broker.stop()
        wait_metric(daemon, "edged_mqtt_connected", 0.0)
        assert http("POST", daemon.url + "/v2/repository/models/digits-onnx/unload", b"{}")[0] == 200
        wait_metric(daemon, "edged_outbox_depth", 1.0)
        broker.start()
        wait_metric(daemon, "edged_mqtt_connected", 1.0)
        wait_metric(daemon, "edged_outbox_depth", 0.0)
        assert metric(daemon, "edged_mqtt_reconnects_total") >= 1
        watcher = Peer(broker.port, client_id="rc1-watcher", clean=False)
        while (event := json.loads(watcher.get().payload))["model"] != "digits-onnx":
            pass
        assert event["event"] == "unloaded"
        watcher.close()
    finally:
        daemon.stop()
        broker.stop()


def test_push_group_deleted_on_shutdown(demo_bundles, pushgateway_factory, tmp_path):
    gateway = pushgateway_factory().start()
    daemon = start_pushing_daemon(tmp_path, demo_bundles, gateway.port, "del1")

    def groups() -> list[dict]:
        return [g for g in json.loads(http("GET", f"http://127.0.0.1:{gateway.port}/api/v1/metrics")[1])["data"]
                if g["labels"].get("instance") == "del1"]

    try:
        deadline = time.monotonic() + 60
        while not groups():
            assert time.monotonic() < deadline, "the daemon never pushed"
            time.sleep(0.1)
        assert daemon.stop() == 0
        assert groups() == []
    finally:
        daemon.stop()
        gateway.stop()
