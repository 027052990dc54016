"""Archive bombs for the bundle tests: a valid tiny bundle plus a large unlisted
file of zeros, packed into a tiny .tar.gz (generated in a stream, never in memory)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from tests.unit.tiny_model import write_tiny_bundle


def make_bomb(tmp_path: Path, unpacked: int, name: str = "bomb.tar.gz") -> Path:
    """A valid tiny bundle plus ``unpacked`` bytes of zeros: a tiny archive."""
    bundle = write_tiny_bundle(tmp_path / "src")
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted(bundle.root.iterdir()):
            tar.add(file, arcname=file.name)
        info = tarfile.TarInfo("zeros.bin")
        info.size = unpacked

        class Zeros(io.RawIOBase):
            def __init__(self):
                self.left = unpacked

            def readable(self):
                return True

            def readinto(self, buffer):
                n = min(len(buffer), self.left)
                buffer[:n] = bytes(n)
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros()))
    return archive
