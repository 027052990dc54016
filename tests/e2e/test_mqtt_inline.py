"""MQTT requests for cheap models run on paho's network thread (the decision, not
its speed), and the durable outbox keeps its guarantees beside inline QoS 0 replies."""

from __future__ import annotations

import json

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from tests.e2e.test_mqtt import Peer, mqtt_toml, samples, wait_metric, wait_online
from tests.helpers import http, start_daemon

RAW = "application/x-edged-tensor"
MODEL = "digits-tflite"


def ask(peer: Peer, device: str, payload: bytes, content_type: str | None = None,
        user: list[tuple[str, str]] | None = None) -> mqtt.MQTTMessage:
    """One request to ``device`` and its reply (its Correlation Data checked)."""
    return peer.request(MODEL, payload, content_type, user, device=device)


def raw_request(peer: Peer, device: str, x: np.ndarray) -> mqtt.MQTTMessage:
    return ask(peer, device, x.tobytes(), RAW, [("dtype", "FP32"), ("shape", ",".join(map(str, x.shape)))])


@pytest.mark.parametrize("inline_max_us,inline", [("1000000000", True), ("0", False)])
def test_inline_decision_follows_inline_max_us_and_payload_size(mqtt_broker, demo_bundles, tmp_path, inline_max_us, inline):
    device = f"inl{inline_max_us[:1]}"
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=mqtt_toml(mqtt_broker.port, qos=0).replace("dev1", device),
                          env={"EDGED_LOAD": MODEL, "EDGED_HTTP_INLINE_MAX_US": inline_max_us})
    peer = None
    try:
        wait_online(mqtt_broker.port, device, daemon)
        peer = Peer(mqtt_broker.port)
        peer.subscribe(f"replies/{peer.client._client_id.decode()}")
        x, expected = samples(demo_bundles, MODEL)
        for i in range(4):
            message = raw_request(peer, device, x[i:i + 1])
            user = dict(message.properties.UserProperty)
            logits = np.frombuffer(message.payload, np.float32).reshape([int(d) for d in user["shape"].split(",")])
            assert logits.argmax(1)[0] == expected[i].argmax()
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[0].reshape(-1).tolist()}]}
        result = json.loads(ask(peer, device, json.dumps(body).encode()).payload)
        assert np.argmax(result["outputs"][0]["data"]) == expected[0].argmax()
        wait_metric(daemon, "edged_mqtt_inline_requests_total", 5.0 if inline else 0.0)
        # Over 64 KiB: decoded on a worker thread whatever the model costs (here: refused for its size).
        big = ask(peer, device, b"\x00" * (65 * 1024), RAW, [("dtype", "FP32"), ("shape", "1,1,8,8")])
        assert dict(big.properties.UserProperty)["error_code"] == "invalid_input"
        assert "needs 256 bytes" in json.loads(big.payload)["error"]
        wait_metric(daemon, "edged_mqtt_inline_requests_total", 5.0 if inline else 0.0)
    finally:
        if peer is not None:
            peer.close()
        daemon.stop()


def test_outbox_results_are_delivered_in_order_between_inline_qos0_replies(mqtt_broker, demo_bundles, tmp_path):
    """paho reports publishes only while outbox rows await their PUBACK: rows published
    after quiet spells and between many QoS 0 replies are still acknowledged (the outbox
    empties) and arrive once each, in order."""
    device = "obx1"
    toml = mqtt_toml(mqtt_broker.port, qos=0, publish_http_results=True).replace("dev1", device)
    daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=toml,
                          env={"EDGED_LOAD": MODEL, "EDGED_HTTP_INLINE_MAX_US": "1000000000"})
    peer = watcher = None
    try:
        wait_online(mqtt_broker.port, device, daemon)
        watcher = Peer(mqtt_broker.port)
        watcher.subscribe(f"edged/{device}/result/{MODEL}")
        peer = Peer(mqtt_broker.port)
        peer.subscribe(f"replies/{peer.client._client_id.decode()}")
        x, expected = samples(demo_bundles, MODEL)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": x[0].reshape(-1).tolist()}]}).encode()
        seqs: list[int] = []
        for _ in range(3):
            for i in range(10):
                message = raw_request(peer, device, x[i:i + 1])
                assert "error_code" not in dict(message.properties.UserProperty)
            for _ in range(5):
                assert http("POST", daemon.url + f"/v2/models/{MODEL}/infer", body)[0] == 200
            for _ in range(5):
                result = json.loads(watcher.get().payload)
                assert result["transport"] == "http"
                seqs.append(result["seq"])
            wait_metric(daemon, "edged_outbox_depth", 0.0)  # every row acknowledged and deleted
        assert seqs == sorted(seqs) and len(set(seqs)) == 15
        assert int(np.argmax(result["outputs"][0]["data"])) == int(expected[0].argmax())
        wait_metric(daemon, "edged_mqtt_inline_requests_total", 30.0)
    finally:
        for client in (peer, watcher):
            if client is not None:
                client.close()
        daemon.stop()
