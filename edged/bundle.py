"""Bundles: a directory (or .tar.gz of one) with a manifest, model files and samples.

The manifest schema and its verification live here and are shared by the
converters, the daemon and OTA updates.

Layout::

    manifest.json     name, version, runtime, tensors, file hashes, provenance
    <model files>     e.g. model.onnx, model.tflite, model.xml + model.bin
    samples.npz       sample inputs ("input:<name>") and expected outputs ("output:<name>")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The archive helpers stay importable from here (OTA, the fleet CLI and the registry use them).
from edged.bundle_archive import DEFAULT_LIMITS, ExtractLimits, is_archive, pack_bundle, safe_extract  # noqa: F401
from edged.errors import BundleError
from edged.tensors import TensorSpec

MANIFEST = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # edged.signing writes it beside the manifest
SAMPLES = "samples.npz"
SCHEMA_VERSION = 1
RUNTIMES = ("tflite", "onnx", "openvino")
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key for semver strings; a pre-release sorts before its release."""
    match = SEMVER.match(version)
    if not match:
        raise BundleError(f"version {version!r} is not semver (MAJOR.MINOR.PATCH)")
    core = version.split("+", 1)[0]
    pre = core.split("-", 1)[1] if "-" in core else ""
    return (int(match[1]), int(match[2]), int(match[3]), 0 if pre else 1, pre)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """The manifest.json of a bundle."""

    name: str
    version: str
    runtime: str
    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    hw_profile: str = "generic"
    files: dict[str, FileEntry] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    # Tolerance used by self-tests: |output - expected| <= atol + rtol * |expected|.
    tolerance: dict[str, float] = field(default_factory=lambda: {"atol": 1e-3, "rtol": 1e-3})
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "hw_profile": self.hw_profile,
            "model_file": self.model_file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
            "provenance": self.provenance,
            "labels": self.labels,
            "validation": self.validation,
            "tolerance": self.tolerance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object")
        try:
            manifest = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                runtime=str(data["runtime"]),
                model_file=str(data["model_file"]),
                inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
                outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
                hw_profile=str(data.get("hw_profile", "generic")),
                files={
                    str(k): FileEntry(sha256=str(v["sha256"]), size=int(v["size"]))
                    for k, v in data.get("files", {}).items()
                },
                provenance=dict(data.get("provenance") or {}),
                labels=list(data["labels"]) if data.get("labels") else None,
                validation=dict(data.get("validation") or {}),
                tolerance=dict(data.get("tolerance") or {"atol": 1e-3, "rtol": 1e-3}),
                schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            )
        except KeyError as exc:
            raise BundleError(f"{source}: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{source}: invalid value: {exc}") from None
        manifest.validate(source)
        return manifest

    def validate(self, source: str = MANIFEST) -> None:
        if not NAME.match(self.name):
            raise BundleError(f"{source}: name {self.name!r} must match {NAME.pattern}")
        if not SEMVER.match(self.version):
            raise BundleError(f"{source}: version {self.version!r} is not semver (MAJOR.MINOR.PATCH)")
        if self.runtime not in RUNTIMES:
            raise BundleError(f"{source}: runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if not self.inputs or not self.outputs:
            raise BundleError(f"{source}: a model needs at least one input and one output")
        for rel in self.files:
            _check_relative(rel, source)
        if self.files and self.model_file not in self.files:
            raise BundleError(f"{source}: model_file {self.model_file!r} is not listed in files")


def _check_relative(rel: str, source: str) -> None:
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or rel.startswith(("/", "\\")):
        raise BundleError(f"{source}: file path {rel!r} escapes the bundle")


@dataclass
class Bundle:
    """An unpacked bundle on disk."""

    root: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    def load_samples(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Sample inputs and expected outputs, keyed by tensor name."""
        path = self.root / SAMPLES
        if not path.exists():
            return {}, {}
        with np.load(path, allow_pickle=False) as data:
            inputs = {k[len("input:"):]: data[k] for k in data.files if k.startswith("input:")}
            outputs = {k[len("output:"):]: data[k] for k in data.files if k.startswith("output:")}
        return inputs, outputs


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    return Manifest.from_dict(data, source=str(path))


def _symlink_in(root: Path, rel: str) -> str | None:
    """The first component of ``root/rel`` (below root) that is a symlink, if any."""
    current = root
    for part in Path(rel).parts:
        current = current / part
        if current.is_symlink():
            return current.relative_to(root).as_posix()
    return None


def unlisted_files(root: Path, manifest: Manifest) -> list[str]:
    """Files (and symlinks) under ``root`` that the manifest does not list, besides
    manifest.json and its manifest.sig. Symlinked directories are not entered."""
    listed = set(manifest.files) | {MANIFEST, SIGNATURE_FILE}
    extra: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (base / d).is_symlink())]:
            rel = (base / name).relative_to(root).as_posix()
            if rel not in listed or (base / name).is_symlink():
                extra.append(rel)
    return sorted(extra)


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256, and that the bundle holds no
    symlink (at any depth) and no file the manifest does not list; name the first
    problem."""
    if not manifest.files:
        raise BundleError(f"{root}: manifest lists no files, nothing can be verified")
    for rel, entry in sorted(manifest.files.items()):
        link = _symlink_in(root, rel)
        if link is not None:
            raise BundleError(f"{rel}: {link} is a symlink; bundles may not contain symlinks")
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{rel}: listed in the manifest but missing from the bundle")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{rel}: size {size} does not match the manifest ({entry.size})")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(f"{rel}: sha256 {digest[:12]}… does not match the manifest ({entry.sha256[:12]}…)")
    extra = unlisted_files(root, manifest)
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise BundleError(f"{root.name}: file(s) not listed in the manifest: {', '.join(extra[:5])}{more}")


def _bundle_root(extracted: Path) -> Path:
    """A tar may hold the files at its top or inside one directory."""
    if (extracted / MANIFEST).is_file():
        return extracted
    children = [p for p in extracted.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / MANIFEST).is_file():
        return children[0]
    raise BundleError(f"{extracted.name}: no {MANIFEST} at the top of the archive")


def open_bundle(path: Path, unpack_dir: Path | None = None, verify: bool = True,
                limits: ExtractLimits = DEFAULT_LIMITS) -> Bundle:
    """Open a bundle directory or archive, verifying hashes unless told not to.

    Archives are unpacked under ``unpack_dir`` (a temporary directory when None)
    in a directory named after the archive's hash, so re-opening is cheap.
    """
    path = Path(path)
    if is_archive(path):
        base = Path(unpack_dir) if unpack_dir else Path(tempfile.mkdtemp(prefix="edged-bundle-"))
        base.mkdir(parents=True, exist_ok=True)
        target = base / f"{path.name.split('.')[0]}-{sha256_file(path)[:16]}"
        if not target.exists():
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=base))
            try:
                safe_extract(path, staging, limits)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        root = _bundle_root(target)
    elif path.is_dir():
        root = path
    else:
        raise BundleError(f"{path}: not a bundle directory or .tar.gz archive")
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest)


def write_bundle(
    dest: Path,
    manifest: Manifest,
    files: dict[str, Path],
    sample_inputs: dict[str, np.ndarray],
    sample_outputs: dict[str, np.ndarray],
    extra_files: dict[str, bytes] | None = None,
) -> Bundle:
    """Write a complete bundle atomically: build in a temp dir, then rename.

    ``files`` maps names inside the bundle to source paths (copied). Hashes of
    every file, samples included, are filled into the manifest.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for rel, source in files.items():
            _check_relative(rel, "bundle")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staging / rel)
        for rel, content in (extra_files or {}).items():
            _check_relative(rel, "bundle")
            (staging / rel).write_bytes(content)
        arrays = {f"input:{k}": v for k, v in sample_inputs.items()}
        arrays.update({f"output:{k}": v for k, v in sample_outputs.items()})
        np.savez(staging / SAMPLES, **arrays)
        manifest.files = {}
        for file in sorted(staging.rglob("*")):
            if file.is_file():
                rel = file.relative_to(staging).as_posix()
                manifest.files[rel] = FileEntry(sha256=sha256_file(file), size=file.stat().st_size)
        manifest.validate("bundle")
        (staging / MANIFEST).write_text(manifest.to_json())
        staging.chmod(0o755)  # mkdtemp makes 0700; the daemon may run as another user
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Bundle(root=dest, manifest=manifest)
