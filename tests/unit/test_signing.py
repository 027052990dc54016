"""Ed25519 bundle signatures: keys, signing, verification and its refusals
(OTA message tests are in test_ota_message.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from edged.errors import ConfigError, SignatureError
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
