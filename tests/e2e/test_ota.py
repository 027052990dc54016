"""Fleet OTA end to end: real mosquitto, a real HTTP bundle server (`edged fleet
serve`), and several daemon processes acting as devices."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edged.ota.message import OtaMessage, device_topic, group_topic
from edged.signing import load_private_key
from tests.brokers import wait_port
from tests.helpers import DEMO_BUNDLES, REPO, DaemonProcess, free_port, http, start_daemon, wait_ready
from tests.ota_release import Keys, expected_outputs, make_keys, make_release, message_for, pack

pytestmark = pytest.mark.slow

MODEL = "digits"


# -- fixtures ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def releases(tmp_path_factory, demo_bundles, keys) -> dict[str, Path]:
    """Signed releases of one model: v1 (ONNX), v2 (OpenVINO: other outputs), and bad ones."""
    out = tmp_path_factory.mktemp("releases")
    other = make_keys(tmp_path_factory.mktemp("other-keys"), "intruder")
    return {
        "1.0.0": make_release(demo_bundles / "digits-onnx", out, MODEL, "1.0.0", keys.private),
        "2.0.0": make_release(demo_bundles / "digits-openvino", out, MODEL, "2.0.0", keys.private),
        "0.9.0": make_release(demo_bundles / "digits-onnx", out, MODEL, "0.9.0", keys.private),
        "3.0.0-selftest": make_release(demo_bundles / "digits-onnx", out / "st", MODEL, "3.0.0", keys.private, spoil_samples=True),
        "3.0.0-unknown-key": make_release(demo_bundles / "digits-onnx", out / "uk", MODEL, "3.0.0", other.private),
        "3.0.0-unsigned": make_release(demo_bundles / "digits-onnx", out / "us", MODEL, "3.0.0", None),
    }


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory) -> tuple[Path, str]:
    """`edged fleet serve DIR` on a free loopback port: (directory, base URL)."""
    directory = tmp_path_factory.mktemp("served")
    port = free_port()
    log = open(directory.parent / f"fleet-serve-{port}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged.cli", "fleet", "serve", str(directory), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    wait_port(port)
    yield directory, f"http://127.0.0.1:{port}/"
    proc.terminate()
    proc.wait(10)


def start_device(tmp: Path, device: str, broker_port: int, trusted: Path, groups: list[str],
                 v1: Path, extra_ota: str = "", env: dict[str, str] | None = None, wait: bool = True) -> DaemonProcess:
    """A daemon acting as one device: serves v1 from models_dir, follows ``groups``."""
    models = tmp / "models"
    if not models.exists():
        models.mkdir(parents=True)
        shutil.copytree(v1, models / MODEL)
    toml = (
        f'device_id = "{device}"\nwarmup_runs = 1\n'
        f"[mqtt]\nenabled = true\nport = {broker_port}\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n"
        f"[ota]\nenabled = true\ngroups = {json.dumps(groups)}\ntrusted_keys_dir = \"{trusted}\"\n"
        f"retry_backoff_s = 0.2\n{extra_ota}\n"
    )
    port = None
    config = tmp / "edged.toml"
    if config.exists():  # a restart keeps the same HTTP port
        port = int(config.read_text().split("[http]\nport = ")[1].split()[0])
    return start_daemon(tmp, models, extra_toml=toml, env=env, wait=wait, port=port)


def publish(broker_port: int, topic: str, message: OtaMessage | None) -> None:
    """Publish (or clear, with None) a retained OTA message and wait for PUBACK."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    info = client.publish(topic, message.to_json() if message else b"", qos=1, retain=True)
    info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def clear_retained(broker_port: int, *topics: str) -> None:
    for topic in topics:
        publish(broker_port, topic, None)


def ota_status(device: DaemonProcess) -> dict[str, Any]:
    status, body = device.get("/v2/ota/status")
    assert status == 200, body
    return body["models"].get(MODEL, {})


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, KeyError, AssertionError) as exc:
            last = exc
            last_ok = None
        else:
            last_ok = last
            if last_ok:
                return last_ok
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def served_version(device: DaemonProcess) -> str:
    status, body = device.get(f"/v2/models/{MODEL}")
    assert status == 200, body
    return body["parameters"]["version"]


SAMPLE = np.random.default_rng(7).integers(0, 17, size=(1, 1, 8, 8)).astype(np.float32)


def infer(device: DaemonProcess, x: np.ndarray = SAMPLE) -> tuple[int, dict[str, Any]]:
    return device.post(f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    })


def check_consistent(device: DaemonProcess, expected: dict[str, np.ndarray]) -> str:
    """The device answers with exactly one version's model: its outputs match that version."""
    status, body = infer(device)
    assert status == 200, body
    version = body["model_version"]
    got = np.asarray(body["outputs"][0]["data"], dtype=np.float32)
    assert np.allclose(got, expected[version].ravel(), atol=1e-4), f"outputs do not match version {version}"
    return version


# -- tests ------------------------------------------------------------------------
def test_publish_to_one_group_moves_only_its_devices(tmp_path, mqtt_broker, bundle_server, releases, keys):
    served_dir, base_url = bundle_server
    archive = pack(releases["2.0.0"], served_dir)
    devices = {  # the three start side by side; each is ready before the update is published
        "dev-a": start_device(tmp_path / "a", "dev-a", mqtt_broker.port, keys.trusted_dir, ["line1"], releases["1.0.0"],
                              wait=False),
        "dev-b": start_device(tmp_path / "b", "dev-b", mqtt_broker.port, keys.trusted_dir, ["line1"], releases["1.0.0"],
                              wait=False),
        "dev-c": start_device(tmp_path / "c", "dev-c", mqtt_broker.port, keys.trusted_dir, ["line2"], releases["1.0.0"],
                              wait=False),
    }
    for device in devices.values():
        wait_ready(device)
    statuses: dict[str, dict] = {}
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: statuses.__setitem__(m.topic.split("/")[1], json.loads(m.payload))
    watcher.connect("127.0.0.1", mqtt_broker.port)
    watcher.subscribe("edged/+/ota/status", qos=1)
    watcher.loop_start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edged.cli", "fleet", "publish", str(archive), "--group", "line1",
             "--url", base_url, "--broker", f"127.0.0.1:{mqtt_broker.port}", "--key", str(keys.private)],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for name in ("dev-a", "dev-b"):
            wait_for(lambda: statuses.get(name, {}).get("models", {}).get(MODEL, {}).get("state") in ("watching", "active")
                     and statuses[name]["models"][MODEL]["active"] == "2.0.0", 60, f"{name} reports 2.0.0")
            assert served_version(devices[name]) == "2.0.0"
        time.sleep(1.0)  # give dev-c every chance to (wrongly) act
        assert served_version(devices["dev-c"]) == "1.0.0"
        assert ota_status(devices["dev-c"])["state"] in ("idle", "")
        assert statuses["dev-c"]["models"][MODEL]["active"] == "1.0.0"
        metrics = http("GET", devices["dev-a"].url + "/metrics")[1].decode()
        assert 'edged_ota_updates_total{model="digits",result="success"} 1.0' in metrics
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        for device in devices.values():
            device.stop()
        clear_retained(mqtt_broker.port, group_topic("edged", "line1", MODEL))


@pytest.mark.parametrize("case, words", [
    ("tampered", "model.onnx"),
    ("bad-signature", "does not match"),
    ("unknown-key", "unknown key"),
    ("unsigned", "unsigned"),
    ("downgrade", "downgrade"),
    ("self-test", "self-test"),
    ("wrong-sha", "sha256"),
])
def test_bad_updates_are_refused_and_v1_keeps_serving(case, words, tmp_path, mqtt_broker, bundle_server, releases, keys):
    served_dir, base_url = bundle_server
    release = {
        "tampered": releases["2.0.0"], "bad-signature": releases["2.0.0"], "wrong-sha": releases["2.0.0"],
        "unknown-key": releases["3.0.0-unknown-key"], "unsigned": releases["3.0.0-unsigned"],
        "downgrade": releases["0.9.0"], "self-test": releases["3.0.0-selftest"],
    }[case]
    if case == "tampered":  # a file changed after signing, repacked: the signed manifest no longer vouches for it
        copy = tmp_path / "tampered" / release.name
        shutil.copytree(release, copy)
        model_file = copy / "model.bin"
        if not model_file.exists():
            model_file = copy / "model.onnx"
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model_file.write_bytes(bytes(data))
        release = copy
        words = model_file.name
    archive = pack(release, served_dir / case)
    # The fleet signs each intent (even for a bad bundle): what is refused here is the bundle.
    message = message_for(archive, base_url + case + "/", release, key=keys.private)
    if case == "bad-signature":
        sig = bytearray(message.signature.signature)
        sig[0] ^= 0x01
        message.signature = type(message.signature)(key_id=message.signature.key_id, signature=bytes(sig))
    if case == "wrong-sha":
        message.sha256 = "0" * 64
    message.sign(load_private_key(keys.private))
    device = start_device(tmp_path / "dev", "dev-r", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"])
    topic = device_topic("edged", "dev-r", MODEL)
    try:
        publish(mqtt_broker.port, topic, message)
        status = wait_for(lambda: ota_status(device) if ota_status(device).get("state") in ("refused", "failed") else None,
                          60, f"{case} refused")
        assert status["state"] == "refused", status
        assert words in status["reason"], status["reason"]
        assert served_version(device) == "1.0.0"
        code, body = infer(device)
        assert code == 200 and body["model_version"] == "1.0.0"
    finally:
        device.stop()
        clear_retained(mqtt_broker.port, topic)


def refused_intents(device: DaemonProcess, reason: str) -> float:
    """edged_ota_intents_refused_total for one reason, from /metrics."""
    text = http("GET", device.url + "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(f'edged_ota_intents_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_update_intents_must_be_signed_on_every_transport(tmp_path, mqtt_broker, bundle_server, releases, keys):
    """Defect: allow_downgrade, url and the rest were unsigned fields, so any client
    reaching POST /v2/ota/update or a fleet topic could install an older signed
    release or make the device fetch any URL. Now the fleet key signs the whole
    message; unsigned, altered, unknown-key, off-prefix and replayed intents are
    refused with the reason over HTTP and MQTT, and v1/v2 keep serving."""
    served_dir, base_url = bundle_server
    fleet = load_private_key(keys.private)
    intruder = make_keys(tmp_path / "intruder", "intruder")
    v2 = pack(releases["2.0.0"], served_dir / "intent")
    old = pack(releases["0.9.0"], served_dir / "intent")
    allowed = base_url + "intent/"

    def signed(archive: Path, root: Path, **changes: Any) -> OtaMessage:
        message = message_for(archive, allowed, root, key=keys.private)
        for name, value in changes.items():
            setattr(message, name, value)
        return message.sign(fleet)

    good = signed(v2, releases["2.0.0"])
    replayed_downgrade = signed(old, releases["0.9.0"], allow_downgrade=True, published_at=time.time() - 3600)
    unsigned = signed(old, releases["0.9.0"], allow_downgrade=True)
    unsigned.intent_signature = None
    altered = signed(old, releases["0.9.0"])
    altered.allow_downgrade = True  # flipped after signing
    unknown = signed(old, releases["0.9.0"], allow_downgrade=True).sign(load_private_key(intruder.private))
    off_prefix = signed(v2, releases["2.0.0"], url=base_url + "elsewhere/x.tar.gz")
    bad = [(unsigned, "unsigned", "unsigned"), (altered, "bad_signature", "does not match"),
           (unknown, "unknown_key", "unknown key"), (off_prefix, "url", "allowed_url_prefixes")]

    device = start_device(tmp_path / "dev", "dev-i", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"],
                          extra_ota=f"allowed_url_prefixes = [{json.dumps(allowed)}]")
    topic = device_topic("edged", "dev-i", MODEL)
    try:
        for message, reason, words in bad:  # HTTP: 409 with the reason, nothing queued
            status, body = device.post("/v2/ota/update", message.to_dict())
            assert status == 409 and words in body["error"], (reason, status, body)
            assert refused_intents(device, reason) == 1
        for message, reason, words in bad:  # MQTT: refused and logged, counted a second time
            publish(mqtt_broker.port, topic, message)
            wait_for(lambda: refused_intents(device, reason) == 2, 60, f"MQTT {reason} refused")
            assert words in device.logs()
        assert served_version(device) == "1.0.0" and ota_status(device).get("state") in ("idle", "", None)

        publish(mqtt_broker.port, topic, good)
        wait_for(lambda: served_version(device) == "2.0.0", 60, "signed v2 applied")
        publish(mqtt_broker.port, topic, replayed_downgrade)  # validly signed, but older: a replay
        wait_for(lambda: refused_intents(device, "replay") == 1, 60, "MQTT replay refused")
        status, body = device.post("/v2/ota/update", replayed_downgrade.to_dict())
        assert status == 409 and "replayed" in body["error"], body
        assert refused_intents(device, "replay") == 2
        assert served_version(device) == "2.0.0"
    finally:
        device.stop()
        clear_retained(mqtt_broker.port, topic)


def test_hot_swap_under_load_loses_no_request(tmp_path, mqtt_broker, bundle_server, releases, keys):
    served_dir, base_url = bundle_server
    archive = pack(releases["2.0.0"], served_dir / "swap")
    expected = {v: expected_outputs(releases[v], SAMPLE)["logits"] for v in ("1.0.0", "2.0.0")}
    assert not np.allclose(expected["1.0.0"], expected["2.0.0"], atol=1e-4), "versions must be told apart by output"
    device = start_device(tmp_path / "dev", "dev-s", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"])
    topic = device_topic("edged", "dev-s", MODEL)
    counts = {"1.0.0": 0, "2.0.0": 0}
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                counts[check_consistent(device, expected)] += 1
            except (AssertionError, KeyError, OSError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: counts["1.0.0"] > 50, 60, "traffic on v1")
        publish(mqtt_broker.port, topic, message_for(archive, base_url + "swap/", releases["2.0.0"]))
        wait_for(lambda: counts["2.0.0"] > 50, 60, "traffic on v2")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        device.stop()
        clear_retained(mqtt_broker.port, topic)
    print(f"hot swap under load: {counts['1.0.0']} requests on 1.0.0, {counts['2.0.0']} on 2.0.0, {len(failures)} failed")
    assert failures == []
    assert counts["1.0.0"] > 50 and counts["2.0.0"] > 50


STATES = ["downloading", "verifying", "unpacking", "loading", "warming", "self_testing",
          "swapping", "persisting", "watching"]


@pytest.mark.parametrize("state", STATES)
def test_kill9_at_each_state_leaves_a_consistent_device(state, tmp_path, mqtt_broker, bundle_server, releases, keys):
    served_dir, base_url = bundle_server
    archive = pack(releases["2.0.0"], served_dir / "kill")
    expected = {v: expected_outputs(releases[v], SAMPLE)["logits"] for v in ("1.0.0", "2.0.0")}
    device = start_device(tmp_path / "dev", "dev-k", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"],
                          env={"EDGED_OTA_CRASH_AT": state})
    topic = device_topic("edged", "dev-k", MODEL)
    try:
        publish(mqtt_broker.port, topic, message_for(archive, base_url + "kill/", releases["2.0.0"]))
        device.proc.wait(60)
        assert device.proc.returncode == -signal.SIGKILL
        offset = len(device.logs())
        device = start_device(tmp_path / "dev", "dev-k", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"])
        check_consistent(device, expected)  # right after the restart: one version's outputs, never a mix
        # What start-up loaded: the old version until the active link moved (persisting), the new one after.
        startup = device.logs()[offset:].split("OTA digits: downloading")[0]  # before the update resumes
        wanted = "2.0.0" if state == "watching" else "1.0.0"
        assert f"loaded digits {wanted}" in startup, startup
        wait_for(lambda: served_version(device) == "2.0.0" and ota_status(device)["state"] in ("watching", "active"),
                 60, "the update completes after the restart")
        assert check_consistent(device, expected) == "2.0.0"
        if state == "downloading":
            assert "interrupted" in device.logs()
    finally:
        device.stop()
        clear_retained(mqtt_broker.port, topic)


def test_update_that_fails_after_the_swap_is_rolled_back(tmp_path, mqtt_broker, bundle_server, releases, keys):
    """v2 passes its self-test but raises on real traffic: its error rate rolls it back."""
    from tests.ota_release import make_faulty_release

    served_dir, base_url = bundle_server
    faulty = make_faulty_release(DEMO_BUNDLES / "digits-onnx", tmp_path / "faulty", MODEL, "2.1.0", keys.private)
    archive = pack(faulty, served_dir / "faulty")
    device = start_device(tmp_path / "dev", "dev-f", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"],
                          extra_ota="health_window_s = 120\nmin_requests = 5\nmax_error_rate = 0.2\n")
    topic = device_topic("edged", "dev-f", MODEL)
    bright = np.full((1, 1, 8, 8), 40.0, dtype=np.float32)  # v1 is fine with it; v2 indexes out of bounds
    try:
        assert infer(device, bright)[0] == 200
        publish(mqtt_broker.port, topic, message_for(archive, base_url + "faulty/", faulty))
        wait_for(lambda: served_version(device) == "2.1.0", 60, "v2 swapped in")
        codes = [infer(device, bright)[0] for _ in range(8)]
        assert 500 in codes, codes  # the fault is real
        status = wait_for(lambda: ota_status(device) if ota_status(device)["state"] == "rolled_back" else None,
                          60, "automatic rollback")
        assert "error rate" in status["reason"] and status["active"] == "1.0.0", status
        assert infer(device, bright)[0] == 200
        # The retained message for the bad release is still there: a restart must not re-apply it.
        device.stop()
        device = start_device(tmp_path / "dev", "dev-f", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"])
        time.sleep(1.5)
        assert served_version(device) == "1.0.0"
        metrics = http("GET", device.url + "/metrics")[1].decode()
        assert "edged_ota_state" in metrics
    finally:
        device.stop()
        clear_retained(mqtt_broker.port, topic)


def test_crash_loop_after_update_rolls_back(tmp_path, mqtt_broker, bundle_server, releases, keys):
    """Unclean restarts inside the health window (kill -9, as a crashing model would
    cause) roll the update back before the model loads again."""
    served_dir, base_url = bundle_server
    archive = pack(releases["2.0.0"], served_dir / "loop")
    extra = "health_window_s = 300\ncrash_loop_restarts = 3\n"
    device = start_device(tmp_path / "dev", "dev-l", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"], extra_ota=extra)
    topic = device_topic("edged", "dev-l", MODEL)
    try:
        publish(mqtt_broker.port, topic, message_for(archive, base_url + "loop/", releases["2.0.0"]))
        # Serving v2 starts at "swapping"; the crash loop is about restarts once the switch is
        # persisted, so wait for "watching" (a kill -9 before that is an interrupted update).
        wait_for(lambda: ota_status(device).get("state") == "watching", 60, "v2 persisted and watched")
        assert served_version(device) == "2.0.0"
        for _ in range(3):
            device.stop(signal.SIGKILL)
            device = start_device(tmp_path / "dev", "dev-l", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"], extra_ota=extra)
        assert served_version(device) == "1.0.0"
        status = ota_status(device)
        assert status["state"] == "rolled_back" and "crash loop" in status["reason"], status
        assert "OTA recovery" in device.logs()
    finally:
        device.stop()
        clear_retained(mqtt_broker.port, topic)


def test_manual_rollback_with_the_cli(tmp_path, mqtt_broker, bundle_server, releases, keys):
    served_dir, base_url = bundle_server
    archive = pack(releases["2.0.0"], served_dir / "manual")
    device = start_device(tmp_path / "dev", "dev-m", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"])
    topic = device_topic("edged", "dev-m", MODEL)
    try:
        publish(mqtt_broker.port, topic, message_for(archive, base_url + "manual/", releases["2.0.0"]))
        wait_for(lambda: served_version(device) == "2.0.0", 60, "v2 active")
        result = subprocess.run([sys.executable, "-m", "edged.cli", "rollback", MODEL, "--url", device.url],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "now serving 1.0.0" in result.stdout
        assert served_version(device) == "1.0.0"
        bad = subprocess.run([sys.executable, "-m", "edged.cli", "rollback", MODEL, "--to", "9.9.9", "--url", device.url],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "9.9.9 is not installed" in bad.stderr
    finally:
        device.stop()
        clear_retained(mqtt_broker.port, topic)


class _CutOnceHandler:
    """Builds a real HTTP server that cuts the first full download in half and
    answers Range requests properly; it records every Range header it saw."""

    @staticmethod
    def serve(path: Path) -> tuple[Any, list[str]]:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        data = path.read_bytes()
        ranges: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                header = self.headers.get("Range")
                ranges.append(header or "")
                if header is None and len(ranges) == 1:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the link drops mid-transfer
                    return
                start = int(header.split("=")[1].split("-")[0]) if header else 0
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, ranges


def test_interrupted_download_resumes_with_range(tmp_path, mqtt_broker, releases, keys):
    archive = pack(releases["2.0.0"], tmp_path / "served")
    server, ranges = _CutOnceHandler.serve(archive)
    device = start_device(tmp_path / "dev", "dev-d", mqtt_broker.port, keys.trusted_dir, [], releases["1.0.0"])
    topic = device_topic("edged", "dev-d", MODEL)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        publish(mqtt_broker.port, topic, message_for(archive, base, releases["2.0.0"]))
        wait_for(lambda: served_version(device) == "2.0.0", 60, "v2 after a resumed download")
        half = archive.stat().st_size // 2
        assert ranges[:2] == ["", f"bytes={half}-"], ranges
        journal = json.loads((tmp_path / "dev" / "state" / "store" / MODEL / "journal.json").read_text())
        assert journal["download_resumed_from"] == [half]
    finally:
        server.shutdown()
        device.stop()
        clear_retained(mqtt_broker.port, topic)
