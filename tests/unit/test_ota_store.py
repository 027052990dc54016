"""The OTA model store: atomic active link, pruning, journals; and downloads
against a real local HTTP server."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

from edged.errors import UpdateFailed, UpdateRefused
from edged.ota.download import DownloadPolicy, check_disk_space, download
from edged.ota.store import ModelStore


def _bundle(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    (path / "manifest.json").write_text("{}")
    return path


def test_install_activate_and_switch_atomically(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.install("m", "1.0.0", _bundle(tmp_path, "a"))
    assert store.active_version("m") is None
    store.activate("m", "1.0.0")
    store.install("m", "2.0.0", _bundle(tmp_path, "b"))
    store.activate("m", "2.0.0")
    link = tmp_path / "store" / "m" / "active"
    assert link.is_symlink() and os.readlink(link) == "2.0.0"
    assert store.active_path("m") == tmp_path / "store" / "m" / "2.0.0"
    assert store.installed("m") == ["1.0.0", "2.0.0"]
    assert store.models() == ["m"]
    assert not list((tmp_path / "store" / "m").glob(".active*"))  # no temp link left behind


def test_active_version_cannot_be_replaced_or_removed(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.install("m", "1.0.0", _bundle(tmp_path, "a"))
    store.activate("m", "1.0.0")
    with pytest.raises(ValueError, match="active"):
        store.install("m", "1.0.0", _bundle(tmp_path, "b"))
    with pytest.raises(ValueError, match="active"):
        store.remove("m", "1.0.0")
    with pytest.raises(FileNotFoundError):
        store.activate("m", "9.0.0")


def test_prune_keeps_active_and_protected(tmp_path):
    store = ModelStore(tmp_path / "store")
    for i, version in enumerate(["1.0.0", "1.1.0", "1.2.0", "2.0.0"]):
        store.install("m", version, _bundle(tmp_path, f"b{i}"))
    store.activate("m", "2.0.0")
    removed = store.prune("m", keep=2, protect={"1.0.0"})
    assert removed == ["1.1.0", "1.2.0"]
    assert store.installed("m") == ["1.0.0", "2.0.0"]


def test_journal_round_trip_and_corrupt_journal(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.write_journal("m", {"state": "watching", "target": "2.0.0"})
    assert store.read_journal("m")["state"] == "watching"
    (tmp_path / "store" / "m" / "journal.json").write_text("{not json")
    assert store.read_journal("m")["state"] == "failed"
    assert store.read_journal("other") == {}


def test_bad_names_are_refused(tmp_path):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.version_dir("../etc", "1.0.0")
    with pytest.raises(ValueError):
        store.version_dir("m", "../../x")


@pytest.fixture()
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_full_and_size_limits(tmp_path, file_server):
    served, base = file_server
    (served / "b.tar.gz").write_bytes(b"x" * 5000)
    policy = DownloadPolicy(max_bytes=10_000, timeout_s=5, retries=0)
    dest = download(f"{base}/b.tar.gz", tmp_path / "dl" / "b.tar.gz", 5000, policy)
    assert dest.read_bytes() == b"x" * 5000
    with pytest.raises(UpdateRefused, match="over the limit"):
        download(f"{base}/b.tar.gz", tmp_path / "dl" / "c.tar.gz", 20_000, policy)
    with pytest.raises(UpdateRefused, match="server sends 5000 bytes"):
        download(f"{base}/b.tar.gz", tmp_path / "dl" / "d.tar.gz", 4000, policy)
    with pytest.raises(UpdateFailed, match="HTTP 404"):
        download(f"{base}/missing.tar.gz", tmp_path / "dl" / "e.tar.gz", 10, policy)


def test_download_retries_then_fails_when_nothing_listens(tmp_path):
    policy = DownloadPolicy(max_bytes=100, timeout_s=1, retries=1, backoff_s=0.01)
    with pytest.raises(UpdateFailed, match="after 2 attempt"):
        download("http://127.0.0.1:9/none", tmp_path / "x.tar.gz", 10, policy)


def test_disk_space_check_names_the_shortfall(tmp_path):
    with pytest.raises(UpdateFailed, match="not enough disk space"):
        check_disk_space(tmp_path, 1 << 60)
    check_disk_space(tmp_path, 1024)


def test_install_and_import_sync_every_file_before_the_rename(tmp_path, monkeypatch):
    """A version directory must survive a power cut whole: every file and directory in it
    is fsynced before it is renamed into the store (make test-vm's OTA power cut once found
    an installed version's manifest.json empty after the boot)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    bundle = _bundle(tmp_path, "a")
    (bundle / "sub").mkdir()
    (bundle / "sub" / "model.bin").write_bytes(b"x" * 10)
    store = ModelStore(tmp_path / "store")
    store.install("m", "1.0.0", bundle)
    for name in ("manifest.json", "sub/model.bin", "sub"):
        assert str(bundle / name) in synced, synced
    synced.clear()
    source = _bundle(tmp_path, "b")
    store.import_copy("m", "0.9.0", source)
    assert any(path.endswith("/manifest.json") and "/store/m/" in path for path in synced), synced
