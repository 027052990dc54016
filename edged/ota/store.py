"""Installed model versions and the active one, on disk, crash-safe.

Layout under ``{state_dir}/store``::

    {model}/{version}/      unpacked, verified bundles (the last N are kept)
    {model}/active          symlink -> {version}; replaced by rename, never edited
    {model}/journal.json    the model's update state (written by rename, fsynced)

A reader after a crash sees either the old or the new ``active`` link, never a
mix: the new version's directory is complete before the link moves to it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edged.bundle import NAME, SEMVER, semver_key

ACTIVE = "active"
JOURNAL = "journal.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: a directory renamed into place
    must not come back after a power cut with empty files (ext4 writes new files'
    data late; a rename alone orders nothing for them)."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_symlink():
            continue
        if path.is_dir():
            _fsync_dir(path)
        else:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, fsync it, rename it over ``path``, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class ModelStore:
    """Versions of OTA-managed models under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        if not NAME.match(model):
            raise ValueError(f"invalid model name {model!r}")
        return self.root / model

    def models(self) -> list[str]:
        """Models that have an active version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / ACTIVE).is_symlink())

    def version_dir(self, model: str, version: str) -> Path:
        if not SEMVER.match(version):
            raise ValueError(f"invalid version {version!r}")
        return self.model_dir(model) / version

    def installed(self, model: str) -> list[str]:
        root = self.model_dir(model)
        if not root.is_dir():
            return []
        versions = [p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and SEMVER.match(p.name)]
        return sorted(versions, key=semver_key)

    def active_version(self, model: str) -> str | None:
        link = self.model_dir(model) / ACTIVE
        try:
            target = os.readlink(link)
        except OSError:
            return None
        return target if (link.parent / target).is_dir() else None

    def active_path(self, model: str) -> Path | None:
        version = self.active_version(model)
        return self.version_dir(model, version) if version else None

    def install(self, model: str, version: str, unpacked: Path) -> Path:
        """Move a complete, verified bundle directory into the store (not active yet)."""
        dest = self.version_dir(model, version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.active_version(model) == version:
            raise ValueError(f"{model} {version} is active; it cannot be replaced in place")
        if dest.exists():
            shutil.rmtree(dest)
        _fsync_tree(unpacked)
        os.replace(unpacked, dest)
        _fsync_dir(dest.parent)
        return dest

    def import_copy(self, model: str, version: str, source: Path) -> Path:
        """Copy a bundle that is served from elsewhere (models_dir) into the store."""
        dest = self.version_dir(model, version)
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            _fsync_tree(staging)
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(dest.parent)
        return dest

    def activate(self, model: str, version: str) -> None:
        """Point ``active`` at ``version`` with one atomic rename."""
        if not self.version_dir(model, version).is_dir():
            raise FileNotFoundError(f"{model} {version} is not installed")
        root = self.model_dir(model)
        tmp = root / f".{ACTIVE}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(version, tmp)
        os.replace(tmp, root / ACTIVE)
        _fsync_dir(root)

    def remove(self, model: str, version: str) -> None:
        if self.active_version(model) == version:
            raise ValueError(f"{model} {version} is active and cannot be removed")
        shutil.rmtree(self.version_dir(model, version), ignore_errors=True)

    def prune(self, model: str, keep: int, protect: set[str] | None = None) -> list[str]:
        """Remove the oldest versions beyond ``keep``; the active one and
        ``protect`` (e.g. the rollback target) always stay."""
        active = self.active_version(model)
        keepers = {v for v in (protect or set()) | {active} if v}
        removable = [v for v in self.installed(model) if v not in keepers]
        excess = len(removable) + len(keepers) - keep
        removed = removable[:max(0, excess)]
        for version in removed:
            self.remove(model, version)
        return removed

    # -- journal ------------------------------------------------------------
    def read_journal(self, model: str) -> dict[str, Any]:
        path = self.model_dir(model) / JOURNAL
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"state": "failed", "reason": f"{path} was unreadable and has been reset"}
        return data if isinstance(data, dict) else {}

    def write_journal(self, model: str, data: dict[str, Any]) -> None:
        write_json_atomic(self.model_dir(model) / JOURNAL, data)

    def journals(self) -> dict[str, dict[str, Any]]:
        if not self.root.is_dir():
            return {}
        return {p.name: self.read_journal(p.name) for p in sorted(self.root.iterdir())
                if p.is_dir() and (p / JOURNAL).is_file()}
