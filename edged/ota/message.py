"""The OTA update message a fleet publishes (retained) and devices act on.

Topics (``prefix`` = ``mqtt.topic_prefix``, ``edged`` by default)::

    {prefix}/fleet/{group}/ota/{model}      one retained message per group and model
    {prefix}/{device}/ota/update/{model}    one retained message for a single device
    {prefix}/{device}/ota/status            retained state of the device's updates

Payload (JSON)::

    {"model": "digits", "version": "2.0.0",
     "url": "http://fleet:8000/digits-2.0.0.tar.gz", "sha256": "...", "size": 123456,
     "signature": {"alg": "ed25519", "key_id": "...", "signature": "..."},
     "rollout": {"devices": [], "canary_percent": 100},
     "allow_downgrade": false, "published_at": 1764000000.0,
     "intent_signature": {"alg": "ed25519", "key_id": "...", "signature": "..."}}

``signature`` is the bundle's own manifest signature; ``intent_signature`` is the
fleet key's signature over every other field of the message (see
``edged.ota.intent``): devices act only on intents signed by a trusted key.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from edged.bundle import NAME, SEMVER
from edged.errors import UpdateRefused
from edged.signing import Signature

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def group_topic(prefix: str, group: str, model: str) -> str:
    return f"{prefix}/fleet/{group}/ota/{model}"


def device_topic(prefix: str, device: str, model: str) -> str:
    return f"{prefix}/{device}/ota/update/{model}"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/ota/status"


@dataclass
class Rollout:
    devices: list[str] = field(default_factory=list)  # empty: every device that receives it
    canary_percent: float = 100.0

    def to_dict(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "canary_percent": self.canary_percent}


@dataclass
class OtaMessage:
    model: str
    version: str
    url: str
    sha256: str
    size: int
    signature: Signature | None = None
    rollout: Rollout = field(default_factory=Rollout)
    allow_downgrade: bool = False
    published_at: float = field(default_factory=time.time)
    intent_signature: Signature | None = None
    # The canonical bytes of the message as received (set by parse): what the
    # intent signature must cover. None for a message built in code.
    received: bytes | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "url": self.url, "sha256": self.sha256,
            "size": self.size, "signature": self.signature.to_dict() if self.signature else None,
            "rollout": self.rollout.to_dict(), "allow_downgrade": self.allow_downgrade,
            "published_at": self.published_at,
            "intent_signature": self.intent_signature.to_dict() if self.intent_signature else None,
        }

    def signed_payload(self) -> bytes:
        """The bytes the intent signature covers (the received message, else this one)."""
        from edged.ota.intent import canonical_bytes

        return self.received if self.received is not None else canonical_bytes(self.to_dict())

    def sign(self, private_key: Any) -> "OtaMessage":
        """Sign this message's intent with the fleet key (after every field is final)."""
        from edged.ota.intent import sign_intent

        self.received = None
        self.intent_signature = sign_intent(self.to_dict(), private_key)
        return self

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def parse(cls, payload: bytes | str | dict[str, Any]) -> "OtaMessage":
        """Parse and validate; every problem is an UpdateRefused naming the field."""
        if isinstance(payload, dict):
            data = payload
        else:
            try:
                data = json.loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise UpdateRefused(f"OTA message is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UpdateRefused("OTA message must be a JSON object")
        missing = [k for k in ("model", "version", "url", "sha256", "size") if k not in data]
        if missing:
            raise UpdateRefused(f"OTA message lacks {', '.join(missing)}")
        model, version, url = str(data["model"]), str(data["version"]), str(data["url"])
        sha256 = str(data["sha256"]).lower()
        if not NAME.match(model):
            raise UpdateRefused(f"OTA message: model {model!r} is not a valid model name")
        if not SEMVER.match(version):
            raise UpdateRefused(f"OTA message: version {version!r} is not semver")
        if not url.startswith(("http://", "https://")):
            raise UpdateRefused(f"OTA message: url {url!r} must be http:// or https://")
        if not SHA256.match(sha256):
            raise UpdateRefused("OTA message: sha256 must be 64 hex digits")
        try:
            size = int(data["size"])
        except (TypeError, ValueError):
            raise UpdateRefused(f"OTA message: size {data['size']!r} is not an integer") from None
        if size <= 0:
            raise UpdateRefused("OTA message: size must be positive")
        signature = None
        if data.get("signature"):
            from edged.errors import SignatureError

            try:
                signature = Signature.from_dict(data["signature"], "OTA message signature")
            except SignatureError as exc:
                raise UpdateRefused(str(exc)) from None
        raw_rollout = data.get("rollout")
        raw_rollout = {} if raw_rollout is None else raw_rollout
        if not isinstance(raw_rollout, dict):
            raise UpdateRefused("OTA message: rollout must be an object")
        try:
            rollout = Rollout(
                devices=[str(d) for d in raw_rollout.get("devices") or []],
                canary_percent=float(raw_rollout.get("canary_percent", 100.0)),
            )
        except (TypeError, ValueError):
            raise UpdateRefused("OTA message: rollout.canary_percent must be a number") from None
        if not 0 <= rollout.canary_percent <= 100:
            raise UpdateRefused("OTA message: rollout.canary_percent must be 0-100")
        try:
            published_at = float(data.get("published_at") or 0.0)
        except (TypeError, ValueError):
            raise UpdateRefused("OTA message: published_at must be a number") from None
        allow_downgrade = data.get("allow_downgrade", False)
        if not isinstance(allow_downgrade, bool):
            raise UpdateRefused("OTA message: allow_downgrade must be true or false")
        from edged.ota.intent import canonical_bytes, parse_intent_signature

        return cls(
            model=model, version=version, url=url, sha256=sha256, size=size, signature=signature,
            rollout=rollout, allow_downgrade=allow_downgrade, published_at=published_at,
            intent_signature=parse_intent_signature(data), received=canonical_bytes(data),
        )

    def targets(self, device: str) -> bool:
        """Whether this device takes part: listed (or no list), and inside the canary slice."""
        if self.rollout.devices and device not in self.rollout.devices:
            return False
        return canary_bucket(device, self.model, self.version) < self.rollout.canary_percent


def canary_bucket(device: str, model: str, version: str) -> float:
    """A stable 0-100 position of a device for one release: the same devices form
    the canary for that release, and a larger percentage only adds devices."""
    digest = hashlib.sha256(f"{device}\0{model}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100
