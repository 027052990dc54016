"""Bundle archives: packing a bundle directory as a .tar.gz and unpacking one
within bounds (archive bombs, links, paths that escape). ``edged.bundle`` opens
archives with these; OTA and the fleet CLI use them through it."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from edged.errors import BundleError


def is_archive(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".tar.gz") or path.name.endswith(".tgz"))


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on unpacking an archive, checked while extracting (archive bombs)."""

    max_bytes: int = 4 * 1024**3  # unpacked bytes, absolute
    max_ratio: float = 200.0  # unpacked bytes / archive bytes ...
    ratio_floor: int = 16 * 1024**2  # ... once more than this has been unpacked
    max_members: int = 10_000

    def budget(self, compressed: int) -> int:
        """The most bytes an archive of ``compressed`` bytes may unpack to."""
        return min(self.max_bytes, max(self.ratio_floor, int(self.max_ratio * max(compressed, 1))))


DEFAULT_LIMITS = ExtractLimits()


def safe_extract(archive: Path, dest: Path, limits: ExtractLimits = DEFAULT_LIMITS) -> None:
    """Extract a .tar.gz in one streaming pass, refusing members that are absolute,
    contain '..', are links, devices or anything but regular files and
    directories, and stopping as soon as the unpacked size passes ``limits``
    (absolute, or as a ratio to the archive's size) or the member count does.
    What was extracted before a refusal stays in ``dest`` for the caller to remove."""
    compressed = Path(archive).stat().st_size if Path(archive).exists() else 0
    budget = limits.budget(compressed)
    written = members = 0

    def over(amount: int) -> BundleError:
        return BundleError(
            f"{archive.name}: unpacks to more than {budget} bytes (at least {amount}) from {compressed} compressed: "
            f"over the limit of {limits.max_bytes} bytes or {limits.max_ratio:g}x the archive (refused while "
            "extracting; an archive bomb?)"
        )

    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = member.name
                parts = Path(name).parts
                if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
                    raise BundleError(f"{archive.name}: member {name!r} escapes the bundle directory")
                if not (member.isfile() or member.isdir()):
                    raise BundleError(
                        f"{archive.name}: member {name!r} is a link or device; only files and directories are allowed"
                    )
                members += 1
                if members > limits.max_members:
                    raise BundleError(f"{archive.name}: more than {limits.max_members} members; refused")
                target = dest / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if written + member.size > budget:
                    raise over(written + member.size)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise BundleError(f"{archive.name}: member {member.name!r} cannot be read")
                with source, open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > budget:
                            raise over(written)
                        out.write(chunk)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive.name}: not a readable .tar.gz: {exc}") from None


def pack_bundle(root: Path, archive: Path) -> Path:
    """Write a bundle directory as a .tar.gz with files at the top level."""
    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted(Path(root).rglob("*")):
            if file.is_file():
                tar.add(file, arcname=file.relative_to(root).as_posix(), recursive=False)
    return archive
