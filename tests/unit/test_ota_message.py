"""The OTA update message: topics, the documented payload, validation (every
problem is an UpdateRefused naming the field), targeting and canary slices."""

from __future__ import annotations

import base64
import json

import pytest

import edged.ota.message as message_module
from edged.errors import UpdateRefused
from edged.ota.message import OtaMessage, Rollout, canary_bucket, device_topic, group_topic, status_topic
from edged.signing import Signature


def _message(**changes):
    data = {"model": "digits", "version": "2.0.0", "url": "http://127.0.0.1:8000/d.tar.gz",
            "sha256": "a" * 64, "size": 10, "published_at": 1.0}
    data.update(changes)
    return data


def test_topics():
    assert group_topic("edged", "line1", "digits") == "edged/fleet/line1/ota/digits"
    assert device_topic("edged", "press-07", "digits") == "edged/press-07/ota/update/digits"
    assert status_topic("site/a", "press-07") == "site/a/press-07/ota/status"


def test_documented_payload_parses():
    doc = message_module.__doc__
    example = doc[doc.index('{"model"'):doc.rindex("}") + 1]
    data = json.loads(example.replace('"..."', '"' + "b" * 64 + '"'))
    data["signature"]["signature"] = base64.b64encode(bytes(64)).decode()
    data["intent_signature"]["signature"] = base64.b64encode(bytes(64)).decode()
    message = OtaMessage.parse(data)
    assert (message.model, message.version, message.size) == ("digits", "2.0.0", 123456)
    assert message.rollout == Rollout(devices=[], canary_percent=100.0)
    assert set(message.to_dict()) == set(data)


def test_round_trip_with_signature():
    signature = Signature(key_id="0123456789abcdef", signature=bytes(range(64)))
    message = OtaMessage(model="digits", version="2.0.0", url="https://fleet/d.tar.gz", sha256="c" * 64, size=5,
                         signature=signature, rollout=Rollout(["a"], 25.0), allow_downgrade=True, published_at=2.0)
    again = OtaMessage.parse(message.to_json())
    assert again == message
    assert json.loads(message.to_json())["signature"]["alg"] == "ed25519"


@pytest.mark.parametrize("change, words", [
    ({"version": "2"}, "semver"),
    ({"url": "ftp://x"}, "http"),
    ({"sha256": "zz"}, "sha256"),
    ({"size": -1}, "positive"),
    ({"size": "big"}, "integer"),
    ({"model": "../x"}, "model name"),
    ({"rollout": {"canary_percent": 150}}, "0-100"),
    ({"rollout": {"canary_percent": "lots"}}, "number"),
    ({"rollout": ["a"]}, "object"),
    ({"rollout": []}, "object"),
    ({"allow_downgrade": "false"}, "true or false"),
    ({"published_at": "noon"}, "published_at"),
    ({"signature": {"alg": "rsa", "key_id": "k", "signature": ""}}, "not supported"),
    ({"signature": {"key_id": "k", "signature": "!!"}}, "base64"),
    ({"intent_signature": {"alg": "rsa", "key_id": "k", "signature": ""}}, "not supported"),
    ({"intent_signature": {"key_id": "k", "signature": "AAAA"}}, "64 bytes"),
    ({"intent_signature": "yes"}, "JSON object"),
])
def test_validation_names_the_field(change, words):
    with pytest.raises(UpdateRefused, match=words):
        OtaMessage.parse(_message(**change))


def test_missing_fields_and_not_json():
    with pytest.raises(UpdateRefused, match="lacks sha256"):
        OtaMessage.parse({k: v for k, v in _message().items() if k != "sha256"})
    with pytest.raises(UpdateRefused, match="not JSON"):
        OtaMessage.parse(b"{")
    with pytest.raises(UpdateRefused, match="JSON object"):
        OtaMessage.parse(b"[1]")


def test_sha256_is_normalised_and_signature_optional():
    message = OtaMessage.parse(_message(sha256="A" * 64, signature=None))
    assert message.sha256 == "a" * 64 and message.signature is None


def test_targeting_and_canary_slices():
    listed = OtaMessage.parse(_message(rollout={"devices": ["a", "b"]}))
    assert listed.targets("a") and not listed.targets("c")
    devices = [f"dev{i}" for i in range(400)]
    ten = {d for d in devices if OtaMessage.parse(_message(rollout={"canary_percent": 10})).targets(d)}
    fifty = {d for d in devices if OtaMessage.parse(_message(rollout={"canary_percent": 50})).targets(d)}
    assert 15 < len(ten) < 70 and ten <= fifty  # a larger canary only adds devices
    assert not any(OtaMessage.parse(_message(rollout={"canary_percent": 0})).targets(d) for d in devices)
    assert all(OtaMessage.parse(_message()).targets(d) for d in devices)
    assert canary_bucket("a", "m", "1.0.0") == canary_bucket("a", "m", "1.0.0")
    assert canary_bucket("a", "m", "1.0.0") != canary_bucket("a", "m", "2.0.0")  # a new slice per release
