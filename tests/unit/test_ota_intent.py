"""Signed update intents (edged.ota.intent): the fleet key's signature covers
every field of the OTA message; devices refuse unsigned, altered, unknown-key,
off-prefix and replayed messages, each with the reason and a counted kind."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from edged.errors import UpdateRefused
from edged.ota.intent import IntentGate, canonical_bytes, url_allowed
from edged.ota.message import OtaMessage, Rollout
from edged.signing import Signature, generate_keypair, load_private_key

FIELDS = {
    "model": "other", "version": "9.0.0", "url": "http://evil.example/x.tar.gz", "sha256": "b" * 64, "size": 999,
    "rollout": {"devices": ["victim"], "canary_percent": 100.0}, "allow_downgrade": True, "published_at": 5.0,
    "signature": Signature(key_id="0123456789abcdef", signature=bytes(64)).to_dict(),
}


@pytest.fixture()
def fleet(tmp_path):
    generate_keypair(tmp_path / "fleet.key", tmp_path / "trusted" / "fleet.pub")
    generate_keypair(tmp_path / "intruder.key", tmp_path / "intruder.pub")
    return tmp_path


def _gate(root: Path, refused: Counter | None = None, **kwargs) -> IntentGate:
    counter = refused if refused is not None else Counter()
    return IntentGate(root / "trusted", root / "state" / "intents.json",
                      on_refused=lambda kind: counter.update([kind]), **kwargs)


def _signed(root: Path, key: str = "fleet.key", **changes) -> dict:
    message = OtaMessage(model="digits", version="2.0.0", url="http://fleet:8000/digits-2.0.0.tar.gz",
                         sha256="a" * 64, size=10, rollout=Rollout([], 100.0), published_at=100.0)
    for name, value in changes.items():
        setattr(message, name, value)
    return json.loads(message.sign(load_private_key(root / key)).to_json())


def test_signed_message_is_accepted_over_its_wire_form(fleet):
    gate = _gate(fleet)
    gate.check(OtaMessage.parse(json.dumps(_signed(fleet)).encode()))
    assert gate.newest("digits") == 100.0


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_every_field_is_covered(fleet, field):
    """Changing any field after signing (allow_downgrade, url, rollout, ...) is refused."""
    data = _signed(fleet)
    data[field] = FIELDS[field]
    refused: Counter = Counter()
    with pytest.raises(UpdateRefused, match="does not match the message"):
        _gate(fleet, refused).check(OtaMessage.parse(data))
    assert refused == Counter(bad_signature=1)


def test_an_added_field_is_covered(fleet):
    data = _signed(fleet)
    data["extra"] = "x"
    with pytest.raises(UpdateRefused, match="does not match"):
        _gate(fleet).check(OtaMessage.parse(data))


def test_unsigned_refused_unless_allow_unsigned(fleet):
    data = _signed(fleet)
    del data["intent_signature"]
    refused: Counter = Counter()
    with pytest.raises(UpdateRefused, match="unsigned.*allow_unsigned is false"):
        _gate(fleet, refused).check(OtaMessage.parse(data))
    assert refused == Counter(unsigned=1)
    _gate(fleet, allow_unsigned=True).check(OtaMessage.parse(data))  # development setting


def test_allow_unsigned_does_not_excuse_a_bad_signature(fleet):
    data = _signed(fleet)
    data["allow_downgrade"] = True
    with pytest.raises(UpdateRefused, match="does not match"):
        _gate(fleet, allow_unsigned=True).check(OtaMessage.parse(data))


def test_unknown_key_and_no_keys(fleet):
    refused: Counter = Counter()
    with pytest.raises(UpdateRefused, match="unknown key"):
        _gate(fleet, refused).check(OtaMessage.parse(_signed(fleet, "intruder.key")))
    gate = IntentGate(fleet / "no-such-dir", fleet / "s.json")
    with pytest.raises(UpdateRefused, match="trusted keys in .*: none"):
        gate.check(OtaMessage.parse(_signed(fleet)))
    assert refused == Counter(unknown_key=1)


def test_forged_signature_bytes(fleet):
    data = _signed(fleet)
    data["intent_signature"] = Signature(key_id=data["intent_signature"]["key_id"], signature=bytes(64)).to_dict()
    with pytest.raises(UpdateRefused, match="does not match"):
        _gate(fleet).check(OtaMessage.parse(data))


def test_replay_of_an_older_message_is_refused_and_survives_restarts(fleet):
    old_downgrade = _signed(fleet, version="0.9.0", allow_downgrade=True, published_at=50.0)
    new = _signed(fleet, version="2.0.0", published_at=100.0)
    refused: Counter = Counter()
    gate = _gate(fleet, refused)
    gate.check(OtaMessage.parse(new))
    gate.check(OtaMessage.parse(new))  # the same message again (a retained message on reconnect)
    with pytest.raises(UpdateRefused, match="older than the newest intent"):
        gate.check(OtaMessage.parse(old_downgrade))
    again = _gate(fleet, refused)  # a restarted daemon remembers the order
    with pytest.raises(UpdateRefused, match="replayed"):
        again.check(OtaMessage.parse(old_downgrade))
    assert refused == Counter(replay=2)
    other_model = _signed(fleet, model="faces", published_at=1.0)
    again.check(OtaMessage.parse(other_model))  # ordering is per model


def test_allowed_url_prefixes(fleet):
    refused: Counter = Counter()
    gate = _gate(fleet, refused, allowed_url_prefixes=["http://fleet:8000/releases/"])
    with pytest.raises(UpdateRefused, match="outside ota.allowed_url_prefixes"):
        gate.check(OtaMessage.parse(_signed(fleet)))
    gate.check(OtaMessage.parse(_signed(fleet, url="http://fleet:8000/releases/d.tar.gz")))
    assert refused == Counter(url=1)


@pytest.mark.parametrize("url, ok", [
    ("http://fleet:8000/a.tar.gz", True),
    ("http://fleet:8000", True),
    ("http://fleet:8000.evil.example/a.tar.gz", False),
    ("http://fleet:8000@evil.example/a.tar.gz", False),
    ("http://fleet:8000/../../etc/passwd", False),
    ("https://fleet:8000/a.tar.gz", False),
])
def test_url_prefix_matching(url, ok):
    assert url_allowed(url, ["http://fleet:8000"]) is ok
    assert url_allowed(url, []) is True


def test_canonical_form_ignores_key_order_and_the_intent_signature():
    a = canonical_bytes({"b": 1, "a": [1.5, "x"], "intent_signature": {"k": 1}})
    assert a == canonical_bytes({"a": [1.5, "x"], "b": 1}) == b'{"a":[1.5,"x"],"b":1}'
    with pytest.raises(UpdateRefused, match="canonical"):
        canonical_bytes({"a": float("nan")})


def test_a_redirect_outside_the_allowed_prefixes_is_refused(tmp_path):
    """The signed url is under the prefix, but the server redirects elsewhere."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edged.ota.download import DownloadPolicy, download

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/releases/"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere/x")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"abc")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    prefixes = [base + "/releases/"]
    try:
        with pytest.raises(UpdateRefused, match="redirected to .*outside ota.allowed_url_prefixes"):
            download(base + "/releases/x", tmp_path / "x", 3, DownloadPolicy(1000, retries=0),
                     url_allowed=lambda url: url_allowed(url, prefixes))
        # Without prefixes the same redirect is followed.
        download(base + "/releases/x", tmp_path / "y", 3, DownloadPolicy(1000, retries=0),
                 url_allowed=lambda url: url_allowed(url, []))
        assert (tmp_path / "y").read_bytes() == b"abc"
    finally:
        server.shutdown()
