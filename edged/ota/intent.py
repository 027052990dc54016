"""Signed update intents: the fleet key signs the whole OTA message, devices
check it before acting on anything the message says.

What is signed is the message's canonical JSON: every field except
``intent_signature`` itself (model, version, url, sha256, size, the bundle's
``signature``, rollout, allow_downgrade, published_at and any other field), as
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``.
The signature sits beside them::

    "intent_signature": {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

A device (``IntentGate.check``) accepts a message only when

- a key in ``ota.trusted_keys_dir`` made its intent signature (an unsigned
  message passes only with ``ota.allow_unsigned``, which is for development);
- its url starts with one of ``ota.allowed_url_prefixes`` (when any are set);
- it is not older than the newest intent already accepted for that model
  (``published_at``, kept in ``{state_dir}/ota/intents.json``): a replayed old
  message is refused, the same message delivered again is not.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from edged.errors import ConfigError, SignatureError, UpdateRefused
from edged.ota.store import write_json_atomic
from edged.signing import Signature, sign_bytes, trusted_keys

INTENT_FIELD = "intent_signature"
REFUSALS = ("unsigned", "unknown_key", "bad_signature", "url", "replay")


def canonical_bytes(data: dict[str, Any]) -> bytes:
    """The bytes an intent signature covers: the message without its intent signature."""
    body = {k: v for k, v in data.items() if k != INTENT_FIELD}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise UpdateRefused(f"OTA message cannot be put in canonical form: {exc}") from None


def sign_intent(data: dict[str, Any], private_key: Any) -> Signature:
    """Sign a message dict (as ``OtaMessage.to_dict`` gives it) with the fleet key."""
    return sign_bytes(private_key, canonical_bytes(data))


def url_allowed(url: str, prefixes: list[str]) -> bool:
    """Whether ``url`` lies under one of ``prefixes`` (no prefixes: any URL).

    A prefix matches at a path boundary ("http://fleet:8000" does not admit
    "http://fleet:8000.evil/"), and URLs with user info or ``..`` segments are
    never admitted under a prefix."""
    if not prefixes:
        return True
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc or "\\" in url or ".." in parts.path.split("/"):
        return False
    for prefix in prefixes:
        if url.startswith(prefix) and (prefix.endswith("/") or url[len(prefix):][:1] in ("", "/", "?")):
            return True
    return False


class IntentGate:
    """Checks each OTA message's intent before the updater queues it."""

    def __init__(self, keys_dir: Path, state_file: Path, allow_unsigned: bool = False,
                 allowed_url_prefixes: list[str] | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.keys_dir = keys_dir
        self.state_file = state_file
        self.allow_unsigned = allow_unsigned
        self.prefixes = list(allowed_url_prefixes or [])
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._newest = self._read_state()

    def _read_state(self) -> dict[str, float]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}

    def newest(self, model: str) -> float | None:
        with self._lock:
            return self._newest.get(model)

    def _refuse(self, kind: str, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(kind)
        raise UpdateRefused(reason)

    def check(self, message: Any) -> None:
        """Raise UpdateRefused (naming the reason) unless ``message`` may be acted
        on; on success remember its ``published_at`` as the model's newest intent."""
        self.verify(message)
        self.admit(message)

    def verify(self, message: Any) -> None:
        """The signature and URL checks (nothing remembered)."""
        self._check_signature(message)
        if not url_allowed(message.url, self.prefixes):
            self._refuse("url", f"OTA message: url {message.url!r} is outside ota.allowed_url_prefixes "
                                f"({', '.join(self.prefixes)})")

    def admit(self, message: Any) -> None:
        """Refuse a replay (older than the newest intent accepted for its model),
        else remember its ``published_at``."""
        with self._lock:
            newest = self._newest.get(message.model)
            if newest is not None and message.published_at < newest:
                self._refuse("replay", f"OTA message for {message.model} published at {message.published_at:.3f} "
                                       f"is older than the newest intent already accepted ({newest:.3f}): "
                                       "a replayed message is refused")
            if newest is None or message.published_at > newest:
                self._newest[message.model] = message.published_at
                write_json_atomic(self.state_file, self._newest)

    def _check_signature(self, message: Any) -> None:
        signature: Signature | None = message.intent_signature
        if signature is None:
            if self.allow_unsigned:
                return
            self._refuse("unsigned", "OTA message is unsigned (no intent_signature; publish it with "
                                     "`edged fleet publish --key FLEET.key`) and ota.allow_unsigned is false")
        try:
            keys = trusted_keys(self.keys_dir)
        except ConfigError as exc:
            self._refuse("unknown_key", f"OTA message refused: trusted keys unreadable: {exc}")
        key = keys.get(signature.key_id)
        if key is None:
            known = ", ".join(sorted(keys)) or "none"
            self._refuse("unknown_key", f"OTA message intent signed by unknown key {signature.key_id}; "
                                        f"trusted keys in {self.keys_dir}: {known}")
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(signature.signature, message.signed_payload())
        except InvalidSignature:
            self._refuse("bad_signature", f"OTA message intent signature by key {signature.key_id} does not match "
                                          "the message: a field was altered after signing")


def parse_intent_signature(data: dict[str, Any]) -> Signature | None:
    raw = data.get(INTENT_FIELD)
    if raw is None:
        return None
    try:
        return Signature.from_dict(raw, "OTA message intent_signature")
    except SignatureError as exc:
        raise UpdateRefused(str(exc)) from None
