"""MQTT workers for ``edged bench --protocol mqtt``: MQTT v5 request/response on the
daemon's topics, ``{prefix}/{device}/infer/{model}`` with a Response Topic and
Correlation Data, one broker connection shared by all of a level's clients."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.bench.load import encode_request
from edged.bench.stats import BenchError
from edged.tensors import v2_datatype

RAW_CONTENT_TYPE = "application/x-edged-tensor"  # edged.transports.mqtt's raw tensor payload
JSON_CONTENT_TYPE = "application/json"
DEFAULT_URL = "http://127.0.0.1:8080"  # where a daemon on this machine listens by default


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    payload: bytes = b""
    user: dict[str, str] = field(default_factory=dict)


class MqttSession:
    """A connected client with its own reply topic; replies are matched to requests
    by Correlation Data, so many threads can wait on one connection."""

    def __init__(self, broker: Any, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.reply_topic = f"{broker.prefix}/bench-replies/{uuid.uuid4().hex}"
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.client = broker.client([self.reply_topic], self._on_message)  # ConfigError when unreachable
        sock = self.client.socket()
        if sock is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages: no Nagle delay

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            pending = self._pending.pop(bytes(correlation), None) if correlation is not None else None
        if pending is not None:
            pending.payload = message.payload
            pending.user = dict(getattr(message.properties, "UserProperty", None) or [])
            pending.done.set()

    def request(self, topic: str, payload: bytes, content_type: str, user: list[tuple[str, str]],
                qos: int) -> _Pending:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        correlation = next(self._ids).to_bytes(8, "big")
        pending = _Pending()
        with self._lock:
            self._pending[correlation] = pending
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        props.ContentType = content_type
        if user:
            props.UserProperty = user
        self.client.publish(topic, payload, qos=qos, properties=props)
        if not pending.done.wait(self.timeout_s):
            with self._lock:
                self._pending.pop(correlation, None)
            raise TimeoutError(f"no reply on {self.reply_topic} within {self.timeout_s:g}s")
        return pending

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class MqttWorker:
    """One client of a level: sends the same request over the shared session."""

    def __init__(self, session: MqttSession, topic: str, arrays: dict[str, np.ndarray], version: str | None,
                 qos: int) -> None:
        self.session = session
        self.topic = topic
        self.qos = qos
        user = [("version", version)] if version else []
        if len(arrays) == 1:  # one tensor: raw bytes, described in the Content Type's parameters
            name, array = next(iter(arrays.items()))
            self.payload = np.ascontiguousarray(array).tobytes()
            named = [("input", name)] if name else []  # "": the daemon takes the model's one input
            # The reply comes described the same way: two properties for paho to parse, not six.
            from edged.transports.mqtt_codec import with_parameters

            self.content_type = with_parameters(RAW_CONTENT_TYPE, [
                *named, ("dtype", v2_datatype(array.dtype)), ("shape", ",".join(map(str, array.shape))), *user])
            self.user = []
        else:
            self.payload, _ = encode_request(arrays, "http-json")  # a KServe V2 JSON body
            self.content_type = JSON_CONTENT_TYPE
            self.user = user

    def call(self) -> None:
        reply = self.session.request(self.topic, self.payload, self.content_type, self.user, self.qos)
        if "error_code" in reply.user:
            try:
                message = json.loads(reply.payload).get("error", "")
            except (ValueError, AttributeError):
                message = reply.payload[:200].decode(errors="replace")
            raise RuntimeError(f"{reply.user['error_code']}: {message}")

    def close(self) -> None:
        """The session is shared; it is closed once, by its owner."""


def infer_topic(prefix: str, device: str, model: str) -> str:
    return f"{prefix}/{device}/infer/{model}"


def find_device(broker: Any, model: str, wait_s: float = 3.0) -> str:
    """The one online device whose retained ``{prefix}/{device}/status`` lists ``model``."""
    statuses: dict[str, Any] = {}
    last = [time.monotonic()]
    prefix = broker.prefix

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        device = message.topic[len(prefix) + 1:-len("/status")]
        try:
            statuses[device] = json.loads(message.payload)
        except ValueError:
            return
        last[0] = time.monotonic()

    client = broker.client([f"{prefix}/+/status"], on_message)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not (statuses and time.monotonic() - last[0] > 0.5):
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    online = {d: s for d, s in statuses.items() if isinstance(s, dict) and s.get("state") == "online"}
    serving = sorted(d for d, s in online.items()
                     if any(isinstance(m, dict) and m.get("name") == model for m in s.get("models") or []))
    where = f"the MQTT broker at {broker.host}:{broker.port}"
    if len(serving) == 1:
        return serving[0]
    if serving:
        raise BenchError(f"devices {', '.join(serving)} on {where} all serve {model}; pick one with --device")
    known = ", ".join(sorted(online)) or "none"
    raise BenchError(f"no online device on {where} lists model {model} in its {prefix}/DEVICE/status "
                     f"(online devices: {known}); give --device, and --topic-prefix if it is not {prefix}")


def bench_mqtt(broker: Any, device: str | None, model: str, version: str | None, url: str | None,
               input_path: Path | None, qos: int, options: Any, on_progress: Any = None) -> dict[str, Any]:
    """The concurrency sweep over MQTT (``options`` is a LoadOptions); inputs from
    ``--input`` or, through ``url``, the model's metadata. Returns the JSON document."""
    from edged.bench.inputs import load_input_file
    from edged.bench.load import check_url, model_inputs, preflight, run_levels, served_version

    meta: dict[str, Any] = {}
    if input_path is not None and url is None:
        arrays = load_input_file(input_path, None)
    elif url is not None:
        check_url(url)
        arrays, meta = model_inputs(url, model, version, input_path, options.timeout_s)
    else:
        try:
            arrays, meta = model_inputs(DEFAULT_URL, model, version, input_path, options.timeout_s)
        except BenchError as exc:
            raise BenchError(f"{exc} (without --input, the model's inputs are read from its metadata over HTTP: "
                             "give --url or --input FILE.npz)") from None
    device = device or find_device(broker, model)
    topic = infer_topic(broker.prefix, device, model)
    session = MqttSession(broker, options.timeout_s)
    try:
        def new_worker() -> MqttWorker:
            return MqttWorker(session, topic, arrays, version, qos)

        preflight(new_worker(), f"model {model} on device {device} ({topic})")
        rows = run_levels(new_worker, options, on_progress)
    finally:
        session.close()
    return {
        "mode": "mqtt", "broker": f"{broker.host}:{broker.port}", "device": device, "topic": topic, "model": model,
        "version": served_version(meta, version), "protocol": "mqtt", "qos": qos,
        "inputs": {k or "(the model's input)": {"dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()},
        "input_source": str(input_path) if input_path else "random, shaped by the model's metadata",
        "warmup": options.warmup, "duration_s": options.duration_s, "iterations": options.iterations, "results": rows,
    }
