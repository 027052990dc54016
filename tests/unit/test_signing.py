"""Ed25519 bundle signatures and OTA messages."""

from __future__ import annotations

import json
import shutil

import pytest

from edged.errors import ConfigError, SignatureError, UpdateRefused
from edged.ota.message import OtaMessage, canary_bucket
from edged.signing import (
    generate_keypair, load_private_key, read_signature, sign_bundle_dir, trusted_keys, verify_bundle_signature,
)
from tests.unit.tiny_model import write_tiny_bundle


@pytest.fixture()
def tiny_bundle(tmp_path):
    return write_tiny_bundle(tmp_path / "tiny").root


@pytest.fixture()
def keypair(tmp_path):
    key_id = generate_keypair(tmp_path / "k.key", tmp_path / "trusted" / "k.pub")
    return key_id, load_private_key(tmp_path / "k.key"), trusted_keys(tmp_path / "trusted")


def _signed(bundle_dir, tmp_path, private):
    copy = tmp_path / "signed"
    shutil.copytree(bundle_dir, copy)
    sign_bundle_dir(copy, private)
    return copy


def test_key_files_and_ids(tmp_path, keypair):
    key_id, _, keys = keypair
    assert list(keys) == [key_id] and len(key_id) == 16
    assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k.key", tmp_path / "trusted" / "k.pub")


def test_sign_and_verify(tiny_bundle, tmp_path, keypair):
    key_id, private, keys = keypair
    root = _signed(tiny_bundle, tmp_path, private)
    assert read_signature(root).key_id == key_id
    assert verify_bundle_signature(root, keys).key_id == key_id


def test_tampered_manifest_fails(tiny_bundle, tmp_path, keypair):
    _, private, keys = keypair
    root = _signed(tiny_bundle, tmp_path, private)
    data = json.loads((root / "manifest.json").read_text())
    data["version"] = "9.9.9"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="does not match manifest.json"):
        verify_bundle_signature(root, keys)


def test_extra_file_unknown_key_and_unsigned(tiny_bundle, tmp_path, keypair):
    _, private, keys = keypair
    root = _signed(tiny_bundle, tmp_path, private)
    (root / "payload.sh").write_text("echo hi")
    with pytest.raises(SignatureError, match="not listed in the manifest: payload.sh"):
        verify_bundle_signature(root, keys)
    (root / "payload.sh").unlink()
    with pytest.raises(SignatureError, match="unknown key"):
        verify_bundle_signature(root, {})
    (root / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle_signature(root, keys)
    assert verify_bundle_signature(root, keys, allow_unsigned=True) is None


def _message(**changes):
    data = {"model": "digits", "version": "2.0.0", "url": "http://127.0.0.1:8000/d.tar.gz",
            "sha256": "a" * 64, "size": 10, "published_at": 1.0}
    data.update(changes)
    return data


def test_message_round_trip_and_validation():
    message = OtaMessage.parse(_message(rollout={"devices": ["a"], "canary_percent": 50}))
    assert OtaMessage.parse(message.to_json()).to_dict() == message.to_dict()
    for change, words in [({"version": "2"}, "semver"), ({"url": "ftp://x"}, "http"), ({"sha256": "zz"}, "sha256"),
                          ({"size": -1}, "positive"), ({"model": "../x"}, "model name"),
                          ({"rollout": {"canary_percent": 150}}, "0-100")]:
        with pytest.raises(UpdateRefused, match=words):
            OtaMessage.parse(_message(**change))
    with pytest.raises(UpdateRefused, match="lacks sha256"):
        OtaMessage.parse({k: v for k, v in _message().items() if k != "sha256"})
    with pytest.raises(UpdateRefused, match="not JSON"):
        OtaMessage.parse(b"{")


def test_targeting_and_canary_slices():
    listed = OtaMessage.parse(_message(rollout={"devices": ["a", "b"]}))
    assert listed.targets("a") and not listed.targets("c")
    devices = [f"dev{i}" for i in range(400)]
    ten = {d for d in devices if OtaMessage.parse(_message(rollout={"canary_percent": 10})).targets(d)}
    fifty = {d for d in devices if OtaMessage.parse(_message(rollout={"canary_percent": 50})).targets(d)}
    assert 15 < len(ten) < 70 and ten <= fifty  # a larger canary only adds devices
    assert canary_bucket("a", "m", "1.0.0") == canary_bucket("a", "m", "1.0.0")
