"""Wires the OTA updater into a daemon: crash recovery before models load,
MQTT update topics in, retained status out, and the data plane's OTA calls."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from edged.errors import UpdateRefused
from edged.ota.message import OtaMessage, device_topic, group_topic, status_topic
from edged.ota.updater import Updater

if TYPE_CHECKING:
    from edged.daemon import Daemon
    from edged.transports.mqtt import MqttTransport

log = logging.getLogger(__name__)


class OtaService:
    """The daemon's OTA service (started after models load, stopped before)."""

    def __init__(self, daemon: "Daemon", mqtt: "MqttTransport | None") -> None:
        self.daemon = daemon
        self.mqtt = mqtt
        self.updater = Updater(daemon.config, daemon.registry, daemon.metrics)
        self.prefix = daemon.config.mqtt.topic_prefix.rstrip("/")
        daemon.prestart.append(self._recover)
        daemon.dataplane.ota = self.updater
        if mqtt is not None:
            for group in daemon.config.ota.groups:
                mqtt.subscriptions[group_topic(self.prefix, group, "+")] = self._on_message
            mqtt.subscriptions[device_topic(self.prefix, daemon.config.device, "+")] = self._on_message
            self.updater.status_listeners.append(self._publish_status)

    def _recover(self) -> None:
        for note in self.updater.recover():
            self.daemon.status(f"OTA recovery: {note}")

    async def start(self) -> None:
        self.updater.start()

    async def stop(self) -> None:
        self.updater.stop()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            message = OtaMessage.parse(payload)
            if topic.rsplit("/", 1)[-1] != message.model:
                log.error("OTA message on %s names model %s; ignored", topic, message.model)
                return
            result = self.updater.submit(message)
        except UpdateRefused as exc:
            log.error("OTA message on %s refused: %s", topic, exc)
            return
        log.info("OTA message on %s for %s %s: %s", topic, message.model, message.version, result)

    def _publish_status(self, status: dict[str, Any]) -> None:
        if self.mqtt is not None:
            self.mqtt.publish_retained(status_topic(self.prefix, self.daemon.config.device), json.dumps(status).encode())


def attach(daemon: "Daemon", mqtt: "MqttTransport | None") -> OtaService:
    service = OtaService(daemon, mqtt)
    daemon.services.append(service)
    return service
