"""Ed25519 bundle signatures.

A bundle's ``manifest.json`` lists the sha256 and size of every file, so signing
the manifest's exact bytes covers the whole bundle. The signature is stored
beside it as ``manifest.sig``::

    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public). A key id is
the first 16 hex digits of the sha256 of the raw 32-byte public key. Devices
trust every ``*.pub`` / ``*.pem`` public key in their trusted-keys directory.

``cryptography`` is imported lazily (pip extra ``ota``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.bundle import MANIFEST, SIGNATURE_FILE, Manifest, unlisted_files
from edged.errors import BundleError, ConfigError, SignatureError
ALG = "ed25519"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError(
            "bundle signatures need the 'cryptography' package: pip install 'edged[ota]'"
        ) from None
    return serialization, ed25519


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes
    alg: str = ALG

    def to_dict(self) -> dict[str, str]:
        return {"alg": self.alg, "key_id": self.key_id, "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_dict(cls, data: Any, source: str = SIGNATURE_FILE) -> "Signature":
        if not isinstance(data, dict):
            raise SignatureError(f"{source}: expected a JSON object with alg, key_id and signature")
        if data.get("alg", ALG) != ALG:
            raise SignatureError(f"{source}: algorithm {data.get('alg')!r} is not supported (only {ALG})")
        try:
            raw = base64.b64decode(str(data["signature"]), validate=True)
            key_id = str(data["key_id"])
        except KeyError as exc:
            raise SignatureError(f"{source}: missing key {exc.args[0]!r}") from None
        except ValueError:
            raise SignatureError(f"{source}: signature is not valid base64") from None
        if len(raw) != 64:
            raise SignatureError(f"{source}: an Ed25519 signature has 64 bytes, got {len(raw)}")
        return cls(key_id=key_id, signature=raw)


def key_id_of(public_key: Any) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair (private key mode 0600); return its key id."""
    serialization, ed25519 = _crypto()
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; refusing to overwrite a key (use --force)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id_of(key.public_key())


def load_private_key(path: Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def trusted_keys(directory: Path) -> dict[str, Any]:
    """Public keys in ``directory`` by key id; a missing directory trusts nothing."""
    keys: dict[str, Any] = {}
    if not directory.is_dir():
        return keys
    for path in sorted(directory.iterdir()):
        if path.suffix in (".pub", ".pem") and path.is_file():
            key = load_public_key(path)
            keys[key_id_of(key)] = key
    return keys


def sign_bytes(private_key: Any, data: bytes) -> Signature:
    return Signature(key_id=key_id_of(private_key.public_key()), signature=private_key.sign(data))


def sign_bundle_dir(root: Path, private_key: Any) -> Signature:
    """Sign ``root/manifest.json`` and write ``root/manifest.sig``."""
    manifest_bytes = (root / MANIFEST).read_bytes()
    Manifest.from_dict(json.loads(manifest_bytes), source=str(root / MANIFEST))  # refuse to sign junk
    signature = sign_bytes(private_key, manifest_bytes)
    tmp = root / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(json.dumps(signature.to_dict(), indent=2) + "\n")
    os.replace(tmp, root / SIGNATURE_FILE)
    return signature


def read_signature(root: Path) -> Signature | None:
    path = root / SIGNATURE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{path}: not valid JSON: {exc}") from None
    return Signature.from_dict(data, str(path))


def verify_manifest_bytes(manifest_bytes: bytes, signature: Signature, keys: dict[str, Any]) -> None:
    """Raise SignatureError unless a trusted key made ``signature`` over the bytes."""
    key = keys.get(signature.key_id)
    if key is None:
        known = ", ".join(sorted(keys)) or "none"
        raise SignatureError(f"signed by unknown key {signature.key_id}; trusted keys: {known}")
    try:
        from cryptography.exceptions import InvalidSignature
    except ImportError:  # _crypto() above already raised if missing
        raise
    try:
        key.verify(signature.signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"signature by key {signature.key_id} does not match manifest.json") from None


def verify_bundle_signature(
    root: Path, keys: dict[str, Any], allow_unsigned: bool = False, signature: Signature | None = None
) -> Signature | None:
    """Check the bundle's manifest signature (or the given one) against trusted keys.

    Also refuses files that the manifest does not list (a signed manifest only
    vouches for listed files). It does NOT hash the listed files: call
    ``edged.bundle.open_bundle`` (which does) as well, as the OTA updater does.
    Returns the signature checked, None when unsigned and allowed."""
    manifest_bytes = (root / MANIFEST).read_bytes()
    manifest = Manifest.from_dict(json.loads(manifest_bytes), source=str(root / MANIFEST))
    extra = unlisted_files(root, manifest)
    if extra:
        raise SignatureError(f"file(s) not listed in the manifest: {', '.join(extra[:5])}")
    bundled = read_signature(root)
    checked = [s for s in (signature, bundled) if s is not None]
    if not checked:
        if allow_unsigned:
            return None
        raise SignatureError("bundle is unsigned (no manifest.sig) and allow_unsigned is false")
    _crypto()
    for sig in checked:
        verify_manifest_bytes(manifest_bytes, sig, keys)
    return checked[0]


def read_archive_manifest(archive: Path) -> tuple[bytes, Signature | None]:
    """The exact bytes of manifest.json and its manifest.sig (if any) inside a
    bundle archive, read without unpacking it (at the top or one directory down)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {posixpath.normpath(m.name): m for m in tar.getmembers() if m.isfile()}
            tops = [n for n in members if posixpath.basename(n) == MANIFEST and n.count("/") <= 1]
            if not tops:
                raise BundleError(f"{Path(archive).name}: no {MANIFEST} at the top of the archive")
            name = min(tops, key=len)
            handle = tar.extractfile(members[name])
            manifest_bytes = handle.read() if handle else b""
            signature = None
            sig_name = name[: -len(MANIFEST)] + SIGNATURE_FILE
            if sig_name in members:
                handle = tar.extractfile(members[sig_name])
                try:
                    data = json.loads(handle.read() if handle else b"")
                except ValueError:
                    raise SignatureError(f"{Path(archive).name}: {SIGNATURE_FILE} is not valid JSON") from None
                signature = Signature.from_dict(data, f"{Path(archive).name}:{SIGNATURE_FILE}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{Path(archive).name}: not a readable .tar.gz: {exc}") from None
    return manifest_bytes, signature
