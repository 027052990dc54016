"""Optional services attached to a daemon from its config (MQTT, metrics push,
systemd notify). Each attach function adds to ``daemon.services`` or its
listeners and does nothing when its section is disabled."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edged.daemon import Daemon


def attach(daemon: "Daemon") -> None:
    """Attach every optional service the daemon's config enables."""
    from edged import sdnotify

    sdnotify.attach(daemon)
    mqtt = None
    if daemon.config.mqtt.enabled:
        from edged.transports.mqtt import MqttTransport

        mqtt = MqttTransport(daemon.config, daemon.dataplane)
        daemon.services.append(mqtt)
    if daemon.config.ota.enabled:
        from edged.ota import service as ota

        ota.attach(daemon, mqtt)
    if daemon.config.push.enabled:
        from edged.push import MetricsPusher

        daemon.services.append(MetricsPusher(daemon.config, daemon.metrics))
