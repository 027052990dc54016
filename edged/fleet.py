"""The fleet side of OTA: serve bundles over HTTP (with Range), publish update
messages, and collect device status from retained MQTT topics."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edged.bundle import MANIFEST, Manifest, is_archive, sha256_file
from edged.errors import BundleError, ConfigError, SignatureError
from edged.ota.message import OtaMessage, Rollout, device_topic, group_topic
from edged import signing
from edged.signing import Signature

log = logging.getLogger(__name__)


# -- bundle server -------------------------------------------------------------------
class BundleRequestHandler(SimpleHTTPRequestHandler):
    """Static files with single-range ``Range`` support (206/416), no listings."""

    server_version = "edged-fleet"

    def list_directory(self, path: str) -> None:  # type: ignore[override]
        self.send_error(HTTPStatus.NOT_FOUND, "directory listing is off")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s range=%s", self.address_string(), format % args, self.headers.get("Range", "-"))

    def send_head(self):  # type: ignore[override]
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "no such bundle")
            return None
        try:
            handle = open(path, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "no such bundle")
            return None
        size = os.fstat(handle.fileno()).st_size
        start, end = 0, size - 1
        header = self.headers.get("Range")
        partial = False
        if header:
            parsed = _parse_range(header, size)
            if parsed is None:
                handle.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            start, end = parsed
            partial = True
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", "application/gzip" if path.endswith((".tar.gz", ".tgz")) else "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Last-Modified", self.date_time_string(int(os.fstat(handle.fileno()).st_mtime)))
        self.end_headers()
        handle.seek(start)
        self._remaining = end - start + 1
        return handle

    def copyfile(self, source: Any, outputfile: Any) -> None:  # type: ignore[override]
        remaining = getattr(self, "_remaining", None)
        while remaining is None or remaining > 0:
            chunk = source.read(min(256 * 1024, remaining) if remaining is not None else 256 * 1024)
            if not chunk:
                break
            outputfile.write(chunk)
            if remaining is not None:
                remaining -= len(chunk)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` -> (start, end); None when unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec or "-" not in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return None
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def serve(directory: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A started-but-not-serving bundle server for ``directory`` (call serve_forever)."""
    root = str(Path(directory).resolve())
    if not os.path.isdir(root):
        raise ConfigError(f"{directory}: not a directory")

    def handler(*args: Any, **kwargs: Any) -> BundleRequestHandler:
        return BundleRequestHandler(*args, directory=root, **kwargs)

    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


# -- publishing --------------------------------------------------------------------
@dataclass
class Broker:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    prefix: str = "edged"

    @classmethod
    def parse(cls, address: str, prefix: str = "edged") -> "Broker":
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "1883")
        try:
            return cls(host=host or "127.0.0.1", port=int(port), prefix=prefix.rstrip("/"))
        except ValueError:
            raise ConfigError(f"broker {address!r} must be HOST:PORT") from None

    def client(self) -> Any:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if self.username:
            client.username_pw_set(self.username, self.password or None)
        if self.tls:
            client.tls_set(ca_certs=self.ca_file or None)
        try:
            client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ConfigError(f"cannot reach the MQTT broker at {self.host}:{self.port}: {exc}") from None
        client.loop_start()
        return client


def read_archive_manifest(archive: Path) -> tuple[Manifest, Signature | None]:
    """The manifest and signature inside a bundle archive, without unpacking it."""
    if not is_archive(archive):
        raise BundleError(f"{archive}: not a .tar.gz bundle (pack a directory with `edged bundle pack`)")
    manifest_bytes, signature = signing.read_archive_manifest(archive)
    try:
        data = json.loads(manifest_bytes)
    except ValueError:
        raise BundleError(f"{archive.name}: {MANIFEST} is not valid JSON") from None
    return Manifest.from_dict(data, f"{archive.name}:{MANIFEST}"), signature


def build_message(
    archive: Path, url: str, devices: list[str] | None = None, canary_percent: float = 100.0,
    allow_downgrade: bool = False, allow_unsigned: bool = False,
) -> OtaMessage:
    """Describe a signed bundle archive as an OTA message. A URL ending in "/"
    gets the archive's file name appended."""
    manifest, signature = read_archive_manifest(archive)
    if signature is None and not allow_unsigned:
        raise SignatureError(f"{archive.name} is not signed: run `edged bundle sign` first (or pass --allow-unsigned)")
    if not 0 <= canary_percent <= 100:
        raise ConfigError("--canary must be between 0 and 100")
    if url.endswith("/"):
        url += urllib.parse.quote(archive.name)
    return OtaMessage(
        model=manifest.name, version=manifest.version, url=url, sha256=sha256_file(archive),
        size=archive.stat().st_size, signature=signature,
        rollout=Rollout(devices=list(devices or []), canary_percent=canary_percent),
        allow_downgrade=allow_downgrade, published_at=time.time(),
    )


def topics_for(broker: Broker, model: str, group: str | None, devices: list[str]) -> list[str]:
    """A group's topic (devices then filter themselves), or one topic per device."""
    if group:
        return [group_topic(broker.prefix, group, model)]
    if not devices:
        raise ConfigError("give --group G, or --devices a,b")
    return [device_topic(broker.prefix, device, model) for device in devices]


def publish(broker: Broker, topics: list[str], payload: bytes, timeout: float = 10.0) -> None:
    """Publish ``payload`` retained at QoS 1 to every topic and wait for each PUBACK
    (an empty payload clears the retained message)."""
    client = broker.client()
    try:
        for topic in topics:
            info = client.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise ConfigError(f"the broker did not acknowledge {topic} within {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()


# -- status ------------------------------------------------------------------------
@dataclass
class DeviceRow:
    device: str
    online: str = "?"
    groups: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "online": self.online, "groups": self.groups, "models": self.models}


class StatusCollector:
    """Keeps the latest retained status and OTA status of every device."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.rows: dict[str, DeviceRow] = {}
        self._lock = threading.Lock()
        self.client: Any = None

    def start(self) -> None:
        self.client = self.broker.client()
        self.client.on_message = self._on_message
        self.client.subscribe(f"{self.broker.prefix}/+/status", qos=1)
        self.client.subscribe(f"{self.broker.prefix}/+/ota/status", qos=1)

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        parts = message.topic.split("/")
        if len(parts) < 3 or not message.payload:
            return
        device = parts[-2] if parts[-1] == "status" and parts[-2] != "ota" else parts[-3]
        try:
            data = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            row = self.rows.setdefault(device, DeviceRow(device))
            row.seen = time.time()
            if parts[-2] == "ota":
                row.groups = list(data.get("groups") or row.groups)
                for name, info in (data.get("models") or {}).items():
                    row.models.setdefault(name, {}).update(info)
            else:
                row.online = str(data.get("state", "?"))
                if data.get("groups"):
                    row.groups = list(data["groups"])
                for model in data.get("models") or []:
                    row.models.setdefault(model.get("name", "?"), {}).setdefault("active", model.get("version", ""))

    def snapshot(self, group: str | None = None) -> list[DeviceRow]:
        with self._lock:
            rows = [DeviceRow(r.device, r.online, list(r.groups), {k: dict(v) for k, v in r.models.items()}, r.seen)
                    for r in self.rows.values()]
        if group:
            rows = [r for r in rows if group in r.groups]
        return sorted(rows, key=lambda r: r.device)


def collect_status(broker: Broker, group: str | None = None, wait_s: float = 2.0) -> list[DeviceRow]:
    """Gather the retained device statuses for ``wait_s`` seconds."""
    collector = StatusCollector(broker)
    collector.start()
    try:
        time.sleep(wait_s)
    finally:
        collector.stop()
    return collector.snapshot(group)
