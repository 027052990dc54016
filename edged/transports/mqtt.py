"""MQTT v5 transport (paho-mqtt 2): thin like HTTP — decode, call the data plane, encode.

Topics (prefix ``edged`` by default, device = ``device_id`` or the hostname):

- ``{prefix}/{device}/infer/{model}``: requests. MQTT v5 request/response: the reply
  goes to the Response Topic with the same Correlation Data, else to
  ``{prefix}/{device}/result/{model}``.
- ``{prefix}/{device}/status``: retained ``online`` summary; the Last Will sets ``offline``.
- ``{prefix}/{device}/events``: model load/unload events.

Results of HTTP inference (``publish_http_results``) and events go through the
durable outbox: delivered at least once, in order, after the broker is back.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import paho.mqtt.client as mqtt
from prometheus_client import Counter, Gauge

from edged import __version__
from edged.config import Config
from edged.dataplane import INLINE_MAX_BYTES, DataPlane, InferenceRequest, InferenceResponse
from edged.metrics import fast_inc
from edged.outbox import Outbox
from edged.model_entry import ModelEntry
from edged.transports.mqtt_client import client_class
from edged.transports.mqtt_codec import (  # noqa: F401 (decode_raw and response_topic_problem are re-exported)
    JSON_CONTENT_TYPE, RawReplyFields, decode_raw, pack_fields, reply_properties, response_topic_problem,
)
from edged.transports.mqtt_requests import MqttRequests
from edged.v2 import encode_response

log = logging.getLogger(__name__)

INFLIGHT = 100  # outbox messages awaiting PUBACK at once


class MqttTransport(MqttRequests):
    """Subscribes to infer topics, answers requests, drains the outbox."""

    def __init__(self, config: Config, dataplane: DataPlane) -> None:
        self.config = config
        self.cfg = config.mqtt
        self.dataplane = dataplane
        self.device = config.device
        prefix = self.cfg.topic_prefix.rstrip("/")
        self.base = f"{prefix}/{self.device}"
        self._setup_metrics()
        self.outbox = Outbox(
            config.state_path / "outbox.sqlite", self.cfg.outbox_max_rows, self.cfg.outbox_max_age_s,
            self.cfg.outbox_drop_policy, max_bytes=self.cfg.outbox_max_bytes, on_drop=self.m_dropped.inc,
        )
        self.m_depth.set_function(self.outbox.depth)
        self.m_age.set_function(self.outbox.oldest_age)
        self.started = time.time()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edged-mqtt")
        # Requests for models that answer within this run on paho's network thread, as
        # HTTP runs them on its event loop: no hop to a worker and back.
        self.inline_max_us = config.http.inline_max_us
        self._raw_fields = RawReplyFields()
        # Owned by the drain thread only: paho's network thread just queues PUBACK mids
        # and connect events, so no lock is shared with paho's own message lock.
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._sent_up_to = 0
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._watching = False  # whether paho reports publishes to _on_publish
        self._reset = threading.Event()  # set on (re)connect: resend every unacknowledged row
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None
        # Extra topic filters and their handlers (topic, payload), e.g. OTA messages.
        # Handlers run on a worker thread, never on paho's network thread.
        self.subscriptions: dict[str, Callable[[str, bytes], None]] = {}
        self.client = self._make_client()
        self._publish_qos0 = getattr(self.client, "publish_qos0", None)  # LeanClient's lean QoS 0 replies

    # -- setup ------------------------------------------------------------
    def _setup_metrics(self) -> None:
        r = self.dataplane.metrics.registry
        self.m_connected = Gauge("edged_mqtt_connected", "1 while connected to the MQTT broker.", registry=r)
        self.m_reconnects = Counter("edged_mqtt_reconnects", "Connections to the broker after the first.", registry=r)
        self.m_inline = Counter("edged_mqtt_inline_requests",
                                "MQTT inferences run on the MQTT network thread (no hop to a worker thread).", registry=r)
        self._count_inline = fast_inc(self.m_inline)
        self.m_dropped = Counter("edged_outbox_dropped", "Outbox messages dropped by its size or age bound.", registry=r)
        self.m_depth = Gauge("edged_outbox_depth", "Messages waiting in the outbox.", registry=r)
        self.m_age = Gauge("edged_outbox_oldest_age_seconds", "Age of the oldest message in the outbox.", registry=r)
        self._connections = 0

    def _make_client(self) -> mqtt.Client:
        client = client_class()(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"edged-{self.device}", protocol=mqtt.MQTTv5,
        )
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password or None)
        if self.cfg.tls:
            client.tls_set(
                ca_certs=self.cfg.ca_file or None, certfile=self.cfg.cert_file or None,
                keyfile=self.cfg.key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.will_set(f"{self.base}/status", json.dumps({"state": "offline", "device": self.device}), qos=1, retain=True)
        client.reconnect_delay_set(self._jittered_min(), max(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s))
        client.max_inflight_messages_set(INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _jittered_min(self) -> float:
        """Exponential backoff (paho doubles up to the max) with a random start, so a
        fleet that lost the same broker does not reconnect in lock-step."""
        return self.cfg.reconnect_min_s * random.uniform(0.5, 1.5)

    # -- lifecycle (Service) ----------------------------------------------
    async def start(self) -> None:
        for entry in self.dataplane.registry.index():  # models loaded before MQTT started
            self._on_model_event("loaded" if entry.ready else entry.state.value.lower(), entry)
        self.dataplane.registry.listeners.append(self._on_model_event)
        if self.cfg.publish_http_results:
            self.dataplane.result_listeners.append(self._on_result)
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()
        self._drainer = threading.Thread(target=self._drain_loop, name="edged-outbox", daemon=True)
        self._drainer.start()

    async def stop(self) -> None:
        if self._on_model_event in self.dataplane.registry.listeners:
            self.dataplane.registry.listeners.remove(self._on_model_event)
        if self._on_result in self.dataplane.result_listeners:
            self.dataplane.result_listeners.remove(self._on_result)
        self._stop.set()
        self._wake.set()
        if self.client.is_connected():
            info = self.client.publish(f"{self.base}/status", json.dumps({"state": "offline", "device": self.device}), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        self.executor.shutdown(wait=True)
        self.outbox.close()

    # -- paho callbacks (network thread: keep them short) ------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connect to %s:%d refused: %s", self.cfg.host, self.cfg.port, reason)
            return
        sock = client.socket()
        if sock is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            # Small request/response messages: no Nagle delay (QoS 1 stalled 40 ms per round trip without it).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections += 1
        if self._connections > 1:
            self.m_reconnects.inc()
        self.m_connected.set(1)
        log.info("MQTT connected to %s:%d as %s", self.cfg.host, self.cfg.port, self.device)
        client.subscribe(f"{self.base}/infer/+", qos=self.cfg.qos)
        for topic_filter in self.subscriptions:
            client.subscribe(topic_filter, qos=1)
        client.publish(f"{self.base}/status", json.dumps(self.status_summary()), qos=1, retain=True)
        self._reset.set()  # the drain thread resends everything not yet acknowledged, in order
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.m_connected.set(0)
        client.reconnect_delay_set(self._jittered_min(), max(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s))
        log.warning("MQTT disconnected: %s", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # Set only while outbox rows await their PUBACK (see _watch_acks). paho calls this
        # holding its own message lock: never publish or take our locks here.
        self._acks.put(mid)
        self._wake.set()

    def _watch_acks(self, on: bool) -> None:
        """Have paho report publishes only while outbox rows await their PUBACK: it builds
        a ReasonCode and a Properties object for every publish it reports, each QoS 0
        reply included. Turned on before the drain thread publishes a row and off once
        every row it published was acknowledged, so no PUBACK of a row is missed."""
        if on != self._watching:
            self._watching = on
            self.client.on_publish = self._on_publish if on else None

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        for topic_filter, callback in self.subscriptions.items():
            if mqtt.topic_matches_sub(topic_filter, message.topic):
                self._submit(self._handle_subscription, callback, message)
                return
        if self.inline_max_us > 0 and len(message.payload) <= INLINE_MAX_BYTES:
            try:
                self._handle_request(message, inline=True)
            except Exception:  # paho's network thread must survive any one message
                log.exception("MQTT request on %r failed", message.topic)
        else:
            self._submit(self._handle_request, message, False)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.executor.submit(fn, *args)
        except RuntimeError:  # shutting down
            pass

    def _handle_subscription(self, callback: Callable[[str, bytes], None], message: mqtt.MQTTMessage) -> None:
        try:
            callback(message.topic, message.payload)
        except Exception:  # never let one message kill the loop
            log.exception("MQTT handler for %s failed", message.topic)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """A retained message through the durable outbox (delivered after outages, in order)."""
        props = json.dumps({"content_type": JSON_CONTENT_TYPE})
        self.outbox.put(topic, payload, qos=1, retain=True, properties=props)
        self._wake.set()

    # -- outbox -------------------------------------------------------------
    def _on_result(self, request: InferenceRequest, response: InferenceResponse, transport: str) -> None:
        if transport == "mqtt":
            return
        body = json.loads(encode_response(response, set(), False)[0])
        body.update({"transport": transport, "device": self.device, "time": time.time()})

        def with_seq(seq: int) -> bytes:  # the outbox id, assigned under the outbox lock
            return json.dumps({**body, "seq": seq}).encode()

        self._enqueue(f"{self.base}/result/{response.model}", with_seq)

    def _on_model_event(self, event: str, entry: ModelEntry) -> None:
        body = {"event": event, "model": entry.name, "version": entry.version, "state": entry.state.value,
                "reason": entry.reason, "device": self.device, "time": time.time()}
        self._enqueue(f"{self.base}/events", json.dumps(body).encode())

    def _enqueue(self, topic: str, payload: bytes | Callable[[int], bytes]) -> None:
        props = json.dumps({"content_type": JSON_CONTENT_TYPE})
        self.outbox.put(topic, payload, qos=max(1, self.cfg.qos), properties=props)  # drops counted by on_drop
        self._wake.set()

    def _take_acks(self) -> None:
        """Delete acknowledged rows. Runs on the drain thread after the mids it
        published were recorded, so a fast PUBACK cannot miss its row; mids of
        responses or of messages sent before a reconnect are not in the map."""
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return
            row = self._inflight.pop(mid, None)
            if row is not None:
                self.outbox.ack(row)

    def _drain_loop(self) -> None:
        """Publish outbox rows in id order while connected; rows leave on PUBACK."""
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._drain_once()
            except Exception:  # e.g. a database error: log, keep the thread alive, retry
                log.exception("MQTT outbox drain failed")
                self._stop.wait(1.0)

    def _drain_once(self) -> None:
        self._take_acks()
        if self._reset.is_set():
            self._reset.clear()
            self._inflight.clear()  # acks of messages from the old connection no longer count
            self._sent_up_to = 0
        try:
            self._publish_rows()
        finally:
            self._watch_acks(bool(self._inflight))

    def _publish_rows(self) -> None:
        while self.client.is_connected() and not self._stop.is_set() and not self._reset.is_set():
            room = INFLIGHT - len(self._inflight)
            if room <= 0:
                return
            batch = self.outbox.peek(limit=room, after=self._sent_up_to)
            if not batch:
                return
            self._watch_acks(True)
            for message in batch:
                content_type = json.loads(message.properties).get("content_type", JSON_CONTENT_TYPE)
                props = reply_properties(pack_fields(content_type, []), None)
                info = self.client.publish(message.topic, message.payload, qos=message.qos,
                                           retain=message.retain, properties=props)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return  # disconnected meanwhile: the next connect resends from the start
                self._inflight[info.mid] = message.id
                self._sent_up_to = message.id
            self._take_acks()

    def status_summary(self) -> dict[str, Any]:
        return {
            "state": "online", "device": self.device, "version": __version__,
            "groups": list(self.config.ota.groups) if self.config.ota.enabled else [],
            "uptime_s": round(time.time() - self.started, 1),
            "models": [{"name": e.name, "version": e.version, "state": e.state.value} for e in self.dataplane.registry.index()],
        }
