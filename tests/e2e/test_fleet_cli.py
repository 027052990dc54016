"""The fleet CLI as a user runs it: keys generate, bundle sign/pack/verify,
fleet publish (a real mosquitto receives the retained message) and fleet status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

from edged.signing import trusted_keys, verify_bundle_signature
from tests.helpers import REPO


def edged(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _subscribe(port: int, topic: str) -> tuple[mqtt.Client, list, threading.Event]:
    got: list = []
    event = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c, u, m):
        got.append(m)
        event.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    return client, got, event


def test_sign_pack_verify_and_tamper(tmp_path, demo_bundles):
    keys = tmp_path / "keys"
    result = edged("keys", "generate", "--out-dir", str(keys), "--name", "fleet")
    assert result.returncode == 0, result.stderr
    assert "trusted-keys" in result.stdout and (keys / "fleet.key").exists()
    again = edged("keys", "generate", "--out-dir", str(keys), "--name", "fleet")
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    bundle = tmp_path / "digits-onnx"
    shutil.copytree(demo_bundles / "digits-onnx", bundle)
    result = edged("bundle", "sign", str(bundle), "--key", str(keys / "fleet.key"))
    assert result.returncode == 0 and "signed" in result.stdout, result.stderr
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys / "fleet.pub", trusted)
    assert verify_bundle_signature(bundle, trusted_keys(trusted)) is not None
    assert edged("bundle", "verify", str(bundle)).returncode == 0
    archive = tmp_path / "digits.tar.gz"
    result = edged("bundle", "pack", str(bundle), "-o", str(archive))
    assert result.returncode == 0 and archive.exists(), result.stderr
    # Signing an archive in place works too, and a tampered bundle is refused.
    assert edged("bundle", "sign", str(archive), "--key", str(keys / "fleet.key")).returncode == 0
    model = bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    result = edged("bundle", "sign", str(bundle), "--key", str(keys / "fleet.key"))
    assert result.returncode != 0 and "model.onnx" in result.stderr


def test_publish_and_status(tmp_path, demo_bundles, mqtt_broker):
    keys = tmp_path / "keys"
    edged("keys", "generate", "--out-dir", str(keys))
    bundle = tmp_path / "b"
    shutil.copytree(demo_bundles / "digits-onnx", bundle)
    archive = tmp_path / "digits-onnx-1.0.0.tar.gz"
    unsigned = edged("bundle", "pack", str(bundle), "-o", str(archive))
    assert unsigned.returncode == 0
    broker = f"127.0.0.1:{mqtt_broker.port}"
    refused = edged("fleet", "publish", str(archive), "--group", "g1", "--url", "http://127.0.0.1:1/", "--broker", broker)
    assert refused.returncode != 0 and "not signed" in refused.stderr
    edged("bundle", "sign", str(archive), "--key", str(keys / "edged.key"))

    client, got, event = _subscribe(mqtt_broker.port, "edged/fleet/g1/ota/+")
    try:
        result = edged("fleet", "publish", str(archive), "--group", "g1", "--devices", "a,b", "--canary", "50",
                       "--url", "http://127.0.0.1:8000/", "--broker", broker)
        assert result.returncode == 0, result.stderr
        assert event.wait(10)
        message = got[-1]
        assert message.topic == "edged/fleet/g1/ota/digits-onnx"
        body = json.loads(message.payload)
        assert body["version"] == "1.0.0" and body["url"] == "http://127.0.0.1:8000/digits-onnx-1.0.0.tar.gz"
        assert body["size"] == archive.stat().st_size and len(body["sha256"]) == 64
        assert body["signature"]["alg"] == "ed25519"
        assert body["rollout"] == {"devices": ["a", "b"], "canary_percent": 50.0}
    finally:
        client.loop_stop()
        client.disconnect()

    # A device's retained statuses, as a daemon publishes them.
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mqtt_broker.port)
    pub.loop_start()
    pub.publish("edged/dev9/status", json.dumps({"state": "online", "device": "dev9", "groups": ["g1"],
                                                  "models": [{"name": "digits", "version": "1.0.0"}]}), qos=1, retain=True).wait_for_publish(5)
    pub.publish("edged/dev9/ota/status", json.dumps({"device": "dev9", "groups": ["g1"], "models": {
        "digits": {"active": "1.0.0", "state": "downloading", "target": "2.0.0", "progress": {"bytes": 5, "total": 10}}}}),
        qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    result = edged("fleet", "status", "--group", "g1", "--json", "--wait", "1", "--broker", broker)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["device"] for r in rows] == ["dev9"]
    assert rows[0]["online"] == "online" and rows[0]["models"]["digits"]["state"] == "downloading"
    table = edged("fleet", "status", "--group", "g1", "--wait", "1", "--broker", broker)
    assert "dev9" in table.stdout and "downloading" in table.stdout and "50%" in table.stdout
    assert json.loads(edged("fleet", "status", "--group", "other", "--json", "--wait", "0.5", "--broker", broker).stdout) == []
    result = edged("fleet", "publish", str(archive), "--group", "g1", "--url", "x", "--clear", "--broker", broker)
    assert result.returncode == 0 and "cleared" in result.stdout
    time.sleep(0.2)
