"""The fleet side of OTA: serve bundles over HTTP (with Range), publish update
messages, and collect device status from retained MQTT topics."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edged.bundle import MANIFEST, Manifest, is_archive, sha256_file
from edged.errors import BundleError, ConfigError, SignatureError, UpdateRefused
from edged.ota.message import OtaMessage, Rollout, device_topic, group_topic
from edged import signing
from edged.signing import Signature

log = logging.getLogger(__name__)


# -- bundle server -------------------------------------------------------------------
CHUNK = 256 * 1024
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class RangeNotSatisfiable(Exception):
    """A well-formed byte range that lies outside the file (answered with 416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b``, ``bytes=a-`` or suffix ``bytes=-n`` range -> inclusive
    (start, end). None means "ignore the header and send the whole file" (another
    unit, several ranges, garbage: RFC 9110 lets a server do that); a range
    outside the file raises RangeNotSatisfiable."""
    match = _RANGE.fullmatch(header)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(header)
    return start, min(end, size - 1)


class BundleRequestHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of regular files under the served directory, with one byte range
    per request (206/416), an ETag (honoured by If-Range) and no listings. Every
    request is logged with its Range header."""

    server_version = "edged-fleet"

    def list_directory(self, path: str) -> None:  # type: ignore[override]
        self.send_error(HTTPStatus.NOT_FOUND, "directory listing is off")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s range=%s", self.address_string(), format % args, self.headers.get("Range", "-"))

    def _file(self) -> str | None:
        """The requested file's real path when it is a regular file inside the root."""
        root = os.path.realpath(self.directory)
        path = os.path.realpath(self.translate_path(self.path))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            return None
        return path

    def send_head(self):  # type: ignore[override]
        path = self._file()
        try:
            handle = open(path, "rb") if path else None
        except OSError:
            handle = None
        if handle is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such bundle")
            return None
        stat = os.fstat(handle.fileno())
        size, etag = stat.st_size, f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        last_modified = self.date_time_string(int(stat.st_mtime))
        span = None
        header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if header and (if_range is None or if_range in (etag, last_modified)):
            try:
                span = parse_range(header, size)
            except RangeNotSatisfiable:
                handle.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
        start, end = span if span else (0, size - 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        self.send_header("Content-Type", "application/gzip" if path.endswith((".tar.gz", ".tgz")) else "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        self.end_headers()
        handle.seek(start)
        self._remaining = end - start + 1
        return handle

    def copyfile(self, source: Any, outputfile: Any) -> None:  # type: ignore[override]
        """Stream the selected bytes in chunks; a client that hangs up (an
        interrupted download, to be resumed) is logged, not a traceback."""
        remaining = self._remaining
        try:
            while remaining > 0:
                chunk = source.read(min(CHUNK, remaining))
                if not chunk:
                    break
                outputfile.write(chunk)
                remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s went away with %d bytes of %s unsent", self.address_string(), remaining, self.path)
            self.close_connection = True


def serve(directory: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A bound bundle server for ``directory``; call ``serve_forever()`` (port 0
    picks a free port: see ``server_address``)."""
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
    """Where and how to reach the fleet's MQTT broker (the devices' ``[mqtt]``)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    prefix: str = "edged"

    @classmethod
    def parse(cls, address: str, prefix: str = "edged") -> "Broker":
        """``HOST:PORT``, ``HOST`` (port 1883) or ``[v6addr]:PORT``."""
        host, sep, port = address.rpartition(":")
        if not sep or host.count(":") and not host.startswith("["):
            host, port = address, "1883"
        try:
            return cls(host=host.strip("[]") or "127.0.0.1", port=int(port), prefix=prefix.rstrip("/"))
        except ValueError:
            raise ConfigError(f"broker {address!r} must be HOST:PORT") from None

    def client(self, subscriptions: list[str] | None = None, on_message: Any = None, timeout: float = 10.0) -> Any:
        """A connected paho client with its network loop running. Returns once the
        broker has accepted the connection (CONNACK); ``subscriptions`` are (re)made
        on every connect. A broker that cannot be reached or refuses us is a ConfigError."""
        import paho.mqtt.client as mqtt

        where = f"the MQTT broker at {self.host}:{self.port}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if self.username:
            client.username_pw_set(self.username, self.password or None)
        if self.tls:
            client.tls_set(ca_certs=self.ca_file or None, certfile=self.cert_file or None, keyfile=self.key_file or None)
        connected = threading.Event()
        reasons: list[Any] = []

        def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
            reasons.append(reason_code)
            if not reason_code.is_failure:
                for topic in subscriptions or []:
                    client.subscribe(topic, qos=1)
            connected.set()

        client.on_connect = on_connect
        if on_message is not None:
            client.on_message = on_message
        try:
            client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot reach {where}: {exc}") from None
        client.loop_start()
        problem = None
        if not connected.wait(timeout):
            problem = f"{where} did not answer the connection within {timeout:g}s"
        elif reasons[-1].is_failure:
            problem = f"{where} refused the connection: {reasons[-1]}"
        if problem:
            client.loop_stop()
            client.disconnect()
            raise ConfigError(problem)
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
    allow_downgrade: bool = False, allow_unsigned: bool = False, fleet_key: Path | None = None,
) -> OtaMessage:
    """Describe a signed bundle archive as an OTA message: model and version from
    its manifest, signature from its manifest.sig, sha256 and size of the archive,
    the whole message then signed with the fleet key (its intent signature).
    A URL ending in "/" gets the archive's file name appended. The result is
    checked the way devices check it, so what devices would refuse fails here."""
    manifest, signature = read_archive_manifest(archive)
    if signature is None and not allow_unsigned:
        raise SignatureError(f"{archive.name} is not signed: run `edged bundle sign` first (or pass --allow-unsigned)")
    if fleet_key is None and not allow_unsigned:
        raise SignatureError(
            "--key FLEET.key is required: devices act only on update intents signed by a key in their "
            "ota.trusted_keys_dir (or pass --allow-unsigned for development devices with ota.allow_unsigned)"
        )
    private_key = signing.load_private_key(fleet_key) if fleet_key is not None else None
    if not 0 <= canary_percent <= 100:
        raise ConfigError("--canary must be between 0 and 100")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {url!r} must be an http:// or https:// URL")
    if url.endswith("/"):
        url += urllib.parse.quote(archive.name)
    message = OtaMessage(
        model=manifest.name, version=manifest.version, url=url, sha256=sha256_file(archive),
        size=archive.stat().st_size, signature=signature,
        rollout=Rollout(devices=list(devices or []), canary_percent=canary_percent),
        allow_downgrade=allow_downgrade, published_at=time.time(),
    )
    if private_key is not None:
        message.sign(private_key)
    try:
        OtaMessage.parse(message.to_dict())
    except UpdateRefused as exc:
        raise ConfigError(f"devices would refuse this message: {exc}") from None
    return message


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
    client = broker.client(timeout=timeout)
    try:
        for topic in topics:
            info = client.publish(topic, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"publishing to {topic} failed: {exc}") from None
            if not info.is_published():
                raise ConfigError(f"the broker did not acknowledge {topic} within {timeout:g}s")
    finally:
        client.disconnect()
        client.loop_stop()


def unpublish(broker: Broker, topics: list[str], timeout: float = 10.0) -> None:
    """Remove the retained update messages on ``topics`` (devices keep what they run)."""
    publish(broker, topics, b"", timeout)


# -- status ------------------------------------------------------------------------
@dataclass
class DeviceRow:
    """One device as its retained ``status`` and ``ota/status`` describe it."""

    device: str
    online: str = "?"
    groups: list[str] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "online": self.online, "groups": self.groups, "models": self.models}


def parse_status_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """``{prefix}/DEV/status`` -> (DEV, "status"), ``{prefix}/DEV/ota/status`` ->
    (DEV, "ota"), anything else None."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1:].split("/")
    if len(parts) == 2 and parts[1] == "status":
        return parts[0], "status"
    if len(parts) == 3 and parts[1:] == ["ota", "status"]:
        return parts[0], "ota"
    return None


class StatusCollector:
    """Keeps the latest retained status and OTA status of every device."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.rows: dict[str, DeviceRow] = {}
        self._lock = threading.Lock()
        self.client: Any = None

    def start(self) -> None:
        prefix = self.broker.prefix
        self.client = self.broker.client([f"{prefix}/+/status", f"{prefix}/+/ota/status"], self._on_message)

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        parsed = parse_status_topic(message.topic, self.broker.prefix)
        if parsed is None or not message.payload:
            return
        try:
            data = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(data, dict):
            self.update(parsed[0], parsed[1], data)

    def update(self, device: str, kind: str, data: dict[str, Any]) -> None:
        """Merge one status ("status") or OTA status ("ota") payload into the device's row."""
        with self._lock:
            row = self.rows.setdefault(device, DeviceRow(device))
            row.seen = time.time()
            if isinstance(data.get("groups"), list) and data["groups"]:
                row.groups = [str(g) for g in data["groups"]]
            if kind == "ota":
                for name, info in (data.get("models") or {}).items():
                    if isinstance(info, dict):
                        row.models.setdefault(str(name), {}).update(info)
                return
            row.online = str(data.get("state", "?"))
            for model in data.get("models") or []:
                if isinstance(model, dict):
                    row.models.setdefault(str(model.get("name", "?")), {}).setdefault("active", model.get("version", ""))

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
