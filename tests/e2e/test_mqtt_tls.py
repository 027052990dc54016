"""MQTT over TLS against a real mosquitto: the daemon's client reads its requests in
whole socket reads through the TLS layer (LeanClient), small ones and ones spread
over many TLS records alike."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import threading
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.brokers import MOSQUITTO, Process
from tests.e2e.test_mqtt import samples
from tests.helpers import free_port, start_daemon

MODEL = "digits-tflite"
DEVICE = "tls1"
RAW = "application/x-edged-tensor"


def tls_broker(tmp: Path) -> tuple[Process, Path]:
    """A stopped mosquitto with one TLS listener, and the certificate to trust
    (self-signed, for 127.0.0.1)."""
    for tool in (MOSQUITTO, "openssl"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    tmp.mkdir(parents=True, exist_ok=True)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", f"certfile {cert}", f"keyfile {key}", "allow_anonymous true",
             "set_tcp_nodelay true", "persistence false"]
    if os.geteuid() == 0:
        lines.append("user root")  # else mosquitto drops to user mosquitto, who cannot read tmp
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return Process([MOSQUITTO, "-c", str(conf)], port, tmp / "mosquitto.log"), cert


class TlsRequester:
    """A paho client over TLS that sends raw tensor requests and waits for each reply."""

    def __init__(self, port: int, cert: Path) -> None:
        self.replies: dict[bytes, mqtt.MQTTMessage] = {}
        self.statuses: list[dict] = []
        self.cond = threading.Condition()
        self.topic = f"replies/{uuid.uuid4().hex}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(60), "no SUBACK from the TLS broker"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.cond:
            if message.topic.endswith("/status"):
                self.statuses.append(json.loads(message.payload))
            else:
                self.replies[bytes(message.properties.CorrelationData)] = message
            self.cond.notify_all()

    def wait_online(self) -> None:
        """The daemon's retained "online" status: it subscribed to its request topics."""
        self.client.subscribe(f"edged/{DEVICE}/status", qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: any(s.get("state") == "online" for s in self.statuses), timeout=60), \
                "the daemon did not come online over TLS"

    def ask(self, payload: bytes, shape: str, correlation: bytes) -> mqtt.MQTTMessage:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        props.ContentType = RAW
        props.UserProperty = [("dtype", "FP32"), ("shape", shape)]
        self.client.publish(f"edged/{DEVICE}/infer/{MODEL}", payload, qos=1, properties=props)
        with self.cond:
            assert self.cond.wait_for(lambda: correlation in self.replies, timeout=60), "no reply over TLS"
            return self.replies.pop(correlation)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_requests_over_tls_small_and_over_many_records(demo_bundles, tmp_path):
    broker, cert = tls_broker(tmp_path / "broker")
    broker.start()
    toml = (f'device_id = "{DEVICE}"\n[mqtt]\nenabled = true\nport = {broker.port}\ntls = true\n'
            f'ca_file = "{cert}"\nhost = "127.0.0.1"\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n')
    daemon = requester = None
    try:
        daemon = start_daemon(tmp_path / "d", demo_bundles, extra_toml=toml, env={"EDGED_LOAD": MODEL})
        requester = TlsRequester(broker.port, cert)
        x, expected = samples(demo_bundles, MODEL)
        requester.wait_online()
        for n in range(3 * len(x)):
            i = n % len(x)
            reply = requester.ask(x[i:i + 1].tobytes(), "1,1,8,8", f"r{n}".encode())
            user = dict(reply.properties.UserProperty)
            assert "error_code" not in user, reply.payload
            logits = np.frombuffer(reply.payload, np.float32).reshape([int(d) for d in user["shape"].split(",")])
            assert logits.argmax(1)[0] == expected[i].argmax()
        # 160 KiB: many TLS records, read in pieces; refused for its size, with the reason.
        big = requester.ask(b"\x00" * (160 * 1024), "1,1,8,8", b"big")
        assert dict(big.properties.UserProperty)["error_code"] == "invalid_input"
        assert b"needs 256 bytes" in big.payload
    finally:
        if requester is not None:
            requester.close()
        if daemon is not None:
            daemon.stop()
        broker.stop()
