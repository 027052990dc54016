"""The fleet CLI as a user runs it: keys generate, bundle sign/pack/verify (and
tampering caught), fleet publish (a real mosquitto keeps the retained message)
and fleet status (from retained statuses published like a daemon does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edged.bundle import safe_extract
from edged.errors import SignatureError
from edged.fleet import read_archive_manifest
from edged.signing import trusted_keys, verify_bundle_signature
from tests.helpers import REPO, LineReader, end_process_group, free_port, run_concurrently


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


def _retained(port: int, topic: str, timeout: float = 60.0) -> list:
    """The retained messages a fresh subscriber to ``topic`` gets. The broker sends
    them right after the SUBACK; a marker published after the SUBACK to a topic of
    our own arrives after all of them, so no fixed wait is needed."""
    marker = f"edged-test/marker/{uuid.uuid4().hex}"
    client, got, _ = _subscribe(port, topic)
    subscribed, done = threading.Event(), threading.Event()
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    client.message_callback_add(marker, lambda c, u, m: done.set())
    try:
        client.subscribe(marker, qos=1)
        assert subscribed.wait(timeout), "no SUBACK from the broker"
        client.publish(marker, b"end", qos=1)
        assert done.wait(timeout), "the marker message never came back"
    finally:
        client.loop_stop()
        client.disconnect()
    return [m for m in got if m.retain and m.topic != marker]


def _publish_retained(port: int, items: dict[str, dict]) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for topic, body in items.items():
        pub.publish(topic, json.dumps(body), qos=1, retain=True).wait_for_publish(60)
    pub.loop_stop()
    pub.disconnect()


@pytest.fixture()
def signing_key(tmp_path) -> Path:
    keys = tmp_path / "keys"
    result = edged("keys", "generate", "--out-dir", str(keys))
    assert result.returncode == 0, result.stderr
    return keys / "edged.key"


@pytest.fixture()
def signed_archive(tmp_path, demo_bundles, signing_key) -> Path:
    bundle = tmp_path / "b"
    shutil.copytree(demo_bundles / "digits-onnx", bundle)
    archive = tmp_path / "digits-onnx-1.0.0.tar.gz"
    assert edged("bundle", "pack", str(bundle), "-o", str(archive)).returncode == 0
    assert edged("bundle", "sign", str(archive), "--key", str(signing_key)).returncode == 0
    return archive


def test_sign_pack_verify_and_tamper(tmp_path, demo_bundles):
    keys = tmp_path / "keys"
    result = edged("keys", "generate", "--out-dir", str(keys), "--name", "fleet")
    assert result.returncode == 0, result.stderr
    assert re.search(r"key id [0-9a-f]{16}", result.stdout)
    assert "/etc/edged/trusted-keys/" in result.stdout and (keys / "fleet.key").exists()
    again = edged("keys", "generate", "--out-dir", str(keys), "--name", "fleet")
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    bundle = tmp_path / "digits-onnx"
    shutil.copytree(demo_bundles / "digits-onnx", bundle)
    result = edged("bundle", "sign", str(bundle), "--key", str(keys / "fleet.key"))
    assert result.returncode == 0 and "signed" in result.stdout, result.stderr
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys / "fleet.pub", trusted)
    keyring = trusted_keys(trusted)
    assert verify_bundle_signature(bundle, keyring) is not None
    assert edged("bundle", "verify", str(bundle)).returncode == 0

    # Pack, then sign the archive in place: the signature inside verifies.
    archive = tmp_path / "digits.tar.gz"
    result = edged("bundle", "pack", str(bundle), "-o", str(archive))
    assert result.returncode == 0 and archive.exists() and "unsigned" not in result.stderr, result.stderr
    assert edged("bundle", "sign", str(archive), "--key", str(keys / "fleet.key")).returncode == 0
    assert read_archive_manifest(archive)[1] is not None and not list(tmp_path.glob(".*.tmp"))
    with tempfile.TemporaryDirectory() as unpacked:
        safe_extract(archive, Path(unpacked))
        assert verify_bundle_signature(Path(unpacked), keyring).key_id == next(iter(keyring))

    # Another key is unknown to these devices.
    assert edged("keys", "generate", "--out-dir", str(keys), "--name", "other").returncode == 0
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    assert edged("bundle", "sign", str(other), "--key", str(keys / "other.key")).returncode == 0
    with pytest.raises(SignatureError, match="unknown key"):
        verify_bundle_signature(other, keyring)

    # Tampering: a file the manifest does not list, an edited manifest, edited bytes.
    (bundle / "extra.py").write_text("import os")
    with pytest.raises(SignatureError, match="extra.py"):
        verify_bundle_signature(bundle, keyring)
    (bundle / "extra.py").unlink()
    manifest = bundle / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b'"1.0.0"', b'"9.0.0"', 1))
    with pytest.raises(SignatureError, match="signature .* does not match manifest.json"):
        verify_bundle_signature(bundle, keyring)
    manifest.write_bytes(original)
    model = bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    result = edged("bundle", "verify", str(bundle))
    assert result.returncode != 0 and "model.onnx" in result.stderr
    result = edged("bundle", "sign", str(bundle), "--key", str(keys / "fleet.key"))
    assert result.returncode != 0 and "model.onnx" in result.stderr


def test_pack_warns_when_unsigned(tmp_path, demo_bundles):
    bundle = tmp_path / "b"
    shutil.copytree(demo_bundles / "digits-onnx", bundle)
    result = edged("bundle", "pack", str(bundle), "-o", str(tmp_path / "b.tar.gz"))
    assert result.returncode == 0 and "unsigned" in result.stderr


def test_publish_to_a_group(tmp_path, demo_bundles, signing_key, mqtt_broker):
    bundle = tmp_path / "u"
    shutil.copytree(demo_bundles / "digits-onnx", bundle)
    unsigned = tmp_path / "unsigned.tar.gz"
    assert edged("bundle", "pack", str(bundle), "-o", str(unsigned)).returncode == 0
    broker = f"127.0.0.1:{mqtt_broker.port}"
    refused = edged("fleet", "publish", str(unsigned), "--group", "g1", "--url", "http://127.0.0.1:1/", "--broker", broker)
    assert refused.returncode != 0 and "not signed" in refused.stderr and "--allow-unsigned" in refused.stderr
    archive = tmp_path / "digits-onnx-1.0.0.tar.gz"
    shutil.copy(unsigned, archive)
    assert edged("bundle", "sign", str(archive), "--key", str(signing_key)).returncode == 0

    client, got, event = _subscribe(mqtt_broker.port, "edged/fleet/g1/ota/+")
    try:
        result = edged("fleet", "publish", str(archive), "--group", "g1", "--devices", "a,b", "--canary", "50",
                       "--url", "http://127.0.0.1:8000/", "--broker", broker, "--key", str(signing_key))
        assert result.returncode == 0, result.stderr
        assert event.wait(10)
    finally:
        client.loop_stop()
        client.disconnect()
    assert got[-1].topic == "edged/fleet/g1/ota/digits-onnx"
    body = json.loads(got[-1].payload)
    assert body["model"] == "digits-onnx" and body["version"] == "1.0.0"
    assert body["url"] == "http://127.0.0.1:8000/digits-onnx-1.0.0.tar.gz"
    assert body["size"] == archive.stat().st_size and len(body["sha256"]) == 64
    assert body["signature"]["alg"] == "ed25519" and len(body["signature"]["key_id"]) == 16
    assert body["rollout"] == {"devices": ["a", "b"], "canary_percent": 50.0}
    assert body["allow_downgrade"] is False and body["published_at"] > 0
    # The whole message is signed with the fleet key (the intent), beside the bundle's signature.
    assert body["intent_signature"]["alg"] == "ed25519"
    assert body["intent_signature"]["key_id"] == body["signature"]["key_id"]
    unkeyed = edged("fleet", "publish", str(archive), "--group", "g1", "--url", "http://127.0.0.1:8000/",
                    "--broker", broker)
    assert unkeyed.returncode != 0 and "--key FLEET.key is required" in unkeyed.stderr

    # Retained: a device that connects later still gets it; --clear removes it.
    later = _retained(mqtt_broker.port, "edged/fleet/g1/ota/+")
    assert [m.topic for m in later] == ["edged/fleet/g1/ota/digits-onnx"]
    result = edged("fleet", "publish", str(archive), "--group", "g1", "--clear", "--broker", broker)
    assert result.returncode == 0 and "cleared edged/fleet/g1/ota/digits-onnx" in result.stdout, result.stderr
    assert _retained(mqtt_broker.port, "edged/fleet/g1/ota/+") == []


def test_publish_to_devices_and_refusals(signed_archive, signing_key, mqtt_broker, monkeypatch):
    broker = f"127.0.0.1:{mqtt_broker.port}"
    monkeypatch.setenv("EDGED_FLEET_KEY", str(signing_key))  # --key from the environment
    result = edged("fleet", "publish", str(signed_archive), "--devices", "d1,d2", "--allow-downgrade",
                   "--url", "https://fleet.example/b.tar.gz", "--broker", broker, "--topic-prefix", "site")
    assert result.returncode == 0, result.stderr
    messages = {m.topic: json.loads(m.payload) for m in _retained(mqtt_broker.port, "site/+/ota/update/+")}
    assert sorted(messages) == ["site/d1/ota/update/digits-onnx", "site/d2/ota/update/digits-onnx"]
    body = messages["site/d1/ota/update/digits-onnx"]
    assert body["url"] == "https://fleet.example/b.tar.gz" and body["allow_downgrade"] is True
    assert body["rollout"] == {"devices": [], "canary_percent": 100.0}

    config = signed_archive.parent / "edged.toml"
    config.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_broker.port}\ntopic_prefix = "cfg"\n')
    result = edged("fleet", "publish", str(signed_archive), "--devices", "d3", "--url", "http://h/", "--config", str(config))
    assert result.returncode == 0 and "cfg/d3/ota/update/digits-onnx" in result.stdout, result.stderr
    assert len(_retained(mqtt_broker.port, "cfg/d3/ota/update/+")) == 1

    # The refusals publish nothing: they run side by side.
    refusals = [
        ([], "--url is required"),
        (["--url", "fleet:8000/x"], "http://"),
        (["--url", "http://h/", "--canary", "120"], "between 0 and 100"),
    ]
    dead = f"127.0.0.1:{free_port()}"
    *refused, no_group, result = run_concurrently([
        *[partial(edged, "fleet", "publish", str(signed_archive), "--group", "g", *args, "--broker", broker)
          for args, _ in refusals],
        partial(edged, "fleet", "publish", str(signed_archive), "--url", "http://h/", "--broker", broker),
        partial(edged, "fleet", "publish", str(signed_archive), "--group", "g", "--url", "http://h/", "--broker", dead),
    ])
    for (args, words), refusal in zip(refusals, refused):
        assert refusal.returncode != 0 and words in refusal.stderr, (args, refusal.stderr)
    assert no_group.returncode != 0 and "--group" in no_group.stderr
    assert result.returncode != 0 and f"cannot reach the MQTT broker at {dead}" in result.stderr
    assert "Traceback" not in result.stderr


def test_status(mqtt_broker):
    port = mqtt_broker.port
    broker = f"127.0.0.1:{port}"
    _publish_retained(port, {
        "edged/dev9/status": {"state": "online", "device": "dev9", "groups": ["g1"], "version": "0.1", "uptime_s": 5,
                              "models": [{"name": "digits", "version": "1.0.0", "state": "ready"}]},
        "edged/dev9/ota/status": {"device": "dev9", "groups": ["g1"], "time": 1.0, "models": {
            "digits": {"active": "1.0.0", "state": "downloading", "target": "2.0.0", "reason": "",
                       "progress": {"bytes": 5, "total": 10}}}},
        "edged/dev8/status": {"state": "offline", "device": "dev8", "groups": ["g1", "g2"],
                              "models": [{"name": "digits", "version": "1.0.0", "state": "ready"}]},
        "edged/dev7/ota/status": {"device": "dev7", "groups": ["g2"], "models": {
            "digits": {"active": "1.0.0", "state": "refused", "target": "0.9.0", "reason": "downgrade"}}},
    })
    # The queries only read the retained statuses: they run side by side, each with its own --wait.
    result, everyone, other, g2_table, g1_table, dead = run_concurrently([
        partial(edged, "fleet", "status", "--group", "g1", "--json", "--wait", "3", "--broker", broker),
        partial(edged, "fleet", "status", "--json", "--wait", "3", "--broker", broker),
        partial(edged, "fleet", "status", "--group", "other", "--json", "--wait", "0.5", "--broker", broker),
        partial(edged, "fleet", "status", "--group", "g2", "--wait", "3", "--broker", broker),
        partial(edged, "fleet", "status", "--group", "g1", "--wait", "3", "--broker", broker),
        partial(edged, "fleet", "status", "--wait", "0", "--broker", f"127.0.0.1:{free_port()}"),
    ], workers=6)
    assert result.returncode == 0, result.stderr
    rows = {r["device"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == ["dev8", "dev9"]
    assert rows["dev9"]["online"] == "online" and rows["dev9"]["groups"] == ["g1"]
    assert rows["dev9"]["models"]["digits"] == {"active": "1.0.0", "state": "downloading", "target": "2.0.0",
                                                "reason": "", "progress": {"bytes": 5, "total": 10}}
    assert rows["dev8"]["online"] == "offline" and rows["dev8"]["models"]["digits"]["active"] == "1.0.0"
    assert {"dev7", "dev8", "dev9"} <= {r["device"] for r in json.loads(everyone.stdout)}
    assert json.loads(other.stdout) == []
    assert g2_table.returncode == 0 and "dev7" in g2_table.stdout and "refused" in g2_table.stdout \
        and "downgrade" in g2_table.stdout
    assert "dev9" in g1_table.stdout and "downloading" in g1_table.stdout and "50%" in g1_table.stdout
    assert dead.returncode != 0 and "cannot reach the MQTT broker" in dead.stderr


def test_status_watch_is_live(mqtt_broker):
    """`--watch` into a pipe prints the table again when a device's status arrives,
    and Ctrl-C ends it cleanly. Each step waits for what the watcher printed (bounds
    met only on failure); the process runs in its own group and is ended by
    SIGTERM/SIGKILL whatever happens, even where `make test &` ignores SIGINT."""
    port = mqtt_broker.port
    # `env --default-signal=INT`: SIGINT acts as at a terminal even when this test
    # run was started in the background, where it is inherited as ignored.
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, "-m", "edged.cli", "fleet", "status",
                             "--group", "live", "--watch", "--wait", "0.2", "--broker", f"127.0.0.1:{port}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
    try:
        out = LineReader(proc.stdout)
        assert out.wait_for("(0 devices)", 120), proc.stderr.read() if proc.poll() is not None else out.text(0)
        _publish_retained(port, {"edged/devL/ota/status": {"device": "devL", "groups": ["live"], "models": {
            "digits": {"active": "2.0.0", "state": "active"}}}})
        assert out.wait_for("devL", 60), out.text(0)
        assert out.wait_for("(1 devices)", 5), out.text(0)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        end_process_group(proc)
