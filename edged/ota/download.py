"""Resumable bundle downloads over HTTP(S): Range requests, a size limit,
timeouts, retries with back-off, and a disk-space check before starting."""

from __future__ import annotations

import http.client
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edged.errors import UpdateFailed, UpdateRefused

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
DISK_MARGIN = 16 * 1024 * 1024


@dataclass
class DownloadPolicy:
    max_bytes: int
    timeout_s: float = 30.0
    retries: int = 5
    backoff_s: float = 2.0


def check_disk_space(directory: Path, needed: int) -> None:
    """Refuse when ``directory``'s filesystem has less than ``needed`` bytes (+ margin) free."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + DISK_MARGIN:
        raise UpdateFailed(
            f"not enough disk space in {directory}: {free // 2**20} MiB free, "
            f"{(needed + DISK_MARGIN) // 2**20} MiB needed"
        )


def download(
    url: str,
    dest: Path,
    size: int,
    policy: DownloadPolicy,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    resumes: list[int] | None = None,
    url_allowed: Callable[[str], bool] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming from ``dest.part`` with a Range
    request. Returns ``dest`` once it holds exactly ``size`` bytes; the byte
    offsets it resumed from are appended to ``resumes``. A redirect to a URL
    that ``url_allowed`` rejects is refused (UpdateRefused)."""
    if size > policy.max_bytes:
        raise UpdateRefused(f"bundle is {size} bytes, over the limit of {policy.max_bytes} (ota.max_bundle_bytes)")
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            if resumes is not None and part.exists() and 0 < part.stat().st_size < size:
                resumes.append(part.stat().st_size)
            _fetch(url, part, size, policy.timeout_s, progress, stop, url_allowed)
            part.replace(dest)
            return dest
        except UpdateRefused:
            raise
        except (OSError, urllib.error.URLError, http.client.HTTPException, UpdateFailed) as exc:
            attempt += 1
            if attempt > policy.retries or (stop is not None and stop.is_set()):
                raise UpdateFailed(f"download of {url} failed after {attempt} attempt(s): {exc}") from None
            delay = policy.backoff_s * 2 ** (attempt - 1)
            have = part.stat().st_size if part.exists() else 0
            log.warning("download of %s failed (%s); retry %d/%d in %.1fs from byte %d",
                        url, exc, attempt, policy.retries, delay, have)
            if stop is not None and stop.wait(delay):
                raise UpdateFailed("download interrupted: the daemon is stopping") from None
            if stop is None:
                time.sleep(delay)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the policy allows."""

    def __init__(self, url_allowed: Callable[[str], bool]) -> None:
        super().__init__()
        self.url_allowed = url_allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not self.url_allowed(newurl):
            raise UpdateRefused(f"bundle server redirected to {newurl!r}, outside ota.allowed_url_prefixes")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, part: Path, size: int, timeout: float,
           progress: Callable[[int, int], None] | None, stop: threading.Event | None,
           url_allowed: Callable[[str], bool] | None = None) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    headers = {"User-Agent": "edged-ota", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        opener = urllib.request.build_opener(*([_CheckedRedirects(url_allowed)] if url_allowed else []))
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            part.unlink()  # our partial file no longer fits the server's: start over
            raise UpdateFailed("server refused the resume range (416); restarting from zero") from None
        # Even a 404 may pass (a bundle published before its upload finished): retry, never refuse for good.
        raise UpdateFailed(f"bundle server answered HTTP {exc.code} for {url}") from None
    with response:
        if have and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                part.unlink()
                raise UpdateFailed(f"unexpected Content-Range {content_range!r} for a resume from {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server ignored Range: take the whole file again
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) > size:
            raise UpdateRefused(f"server sends {have + int(length)} bytes, the update message says {size}")
        with open(part, mode) as out:
            while True:
                if stop is not None and stop.is_set():
                    raise UpdateFailed("download interrupted: the daemon is stopping")
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                have += len(chunk)
                if have > size:
                    raise UpdateRefused(f"server sent more than the {size} bytes the update message says")
                out.write(chunk)
                if progress is not None:
                    progress(have, size)
            out.flush()
    if have != size:
        raise UpdateFailed(f"connection closed after {have} of {size} bytes")

