"""`edged fleet serve` against curl and urllib: full GET of a >10 MB archive,
Range (206), open and suffix ranges, 416, ranges it ignores (200), If-Range,
HEAD, a client that hangs up, and no way out of the served directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from edged.fleet import RangeNotSatisfiable, parse_range
from tests.brokers import wait_port
from tests.helpers import REPO, end_process_group, free_port, http

BIG = 12 * 1024 * 1024 + 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    served = root / "served"
    served.mkdir()
    (root / "secret.txt").write_text("not for you")
    os.symlink(root / "secret.txt", served / "link.tar.gz")  # a link out of DIR is not followed
    data = bytes(range(256)) * 400  # 102400 bytes
    (served / "b.tar.gz").write_bytes(data)
    (served / "big.tar.gz").write_bytes(os.urandom(BIG))
    (served / "empty.bin").write_bytes(b"")
    port = free_port()
    log = root / "serve.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "edged.cli", "fleet", "serve", str(served), "--port", str(port)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=handle, start_new_session=True)
    try:
        wait_port(port)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "data": data, "served": served, "log": log}
    finally:
        end_process_group(proc)


def _log_has(log, text: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return True
        time.sleep(0.05)
    return False


def test_full_get_and_head(server):
    url, data = server["url"], server["data"]
    status, body, headers = http("GET", url + "/b.tar.gz")
    assert status == 200 and body == data
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Length"] == str(len(data))
    assert headers["Content-Type"] == "application/gzip" and headers["ETag"].startswith('"')
    status, body, headers = http("HEAD", url + "/b.tar.gz")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))
    status, body, headers = http("HEAD", url + "/b.tar.gz", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == b"" and headers["Content-Length"] == "10"


def test_big_archive_streams_whole(server):
    status, body, headers = http("GET", server["url"] + "/big.tar.gz", timeout=60)
    assert status == 200 and len(body) == BIG == int(headers["Content-Length"])
    assert hashlib.sha256(body).digest() == hashlib.sha256((server["served"] / "big.tar.gz").read_bytes()).digest()


def test_ranges(server):
    url, data = server["url"], server["data"]
    status, body, headers = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}" and headers["Content-Length"] == "1000"
    status, body, _ = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=100000-"})
    assert status == 206 and body == data[100000:]
    status, body, headers = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:] and headers["Content-Range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
    status, body, _ = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=102000-999999"})  # clipped to the end
    assert status == 206 and body == data[102000:]
    assert _log_has(server["log"], "range=bytes=1000-1999")


@pytest.mark.parametrize("spec", ["bytes=102400-", "bytes=500-100", "bytes=-0"])
def test_unsatisfiable_is_416(server, spec):
    status, body, headers = http("GET", server["url"] + "/b.tar.gz", headers={"Range": spec})
    assert status == 416 and body == b"" and headers["Content-Range"] == f"bytes */{len(server['data'])}"


def test_empty_file(server):
    status, body, headers = http("GET", server["url"] + "/empty.bin")
    assert status == 200 and body == b"" and headers["Content-Length"] == "0"
    assert http("GET", server["url"] + "/empty.bin", headers={"Range": "bytes=0-"})[0] == 416


@pytest.mark.parametrize("spec", ["items=0-10", "bytes=0-1,5-6", "bytes=x-y", "bytes=-"])
def test_ranges_it_ignores_get_the_whole_file(server, spec):
    status, body, _ = http("GET", server["url"] + "/b.tar.gz", headers={"Range": spec})
    assert status == 200 and body == server["data"]


def test_if_range(server):
    url, data = server["url"], server["data"]
    etag = http("HEAD", url + "/b.tar.gz")[2]["ETag"]
    status, body, _ = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=0-9", "If-Range": etag})
    assert status == 206 and body == data[:10]
    status, body, _ = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=0-9", "If-Range": '"changed"'})
    assert status == 200 and body == data  # the file changed since: start over


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_resumes_a_partial_file(server, tmp_path):
    url, data = server["url"], server["data"]
    out = tmp_path / "b.tar.gz"
    out.write_bytes(data[:5000])  # what an interrupted download left
    subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(out), url + "/b.tar.gz"], check=True, timeout=30)
    assert out.read_bytes() == data
    ranged = subprocess.run(["curl", "-sS", "-f", "-r", "100-199", url + "/b.tar.gz"], capture_output=True, check=True, timeout=30)
    assert ranged.stdout == data[100:200]


def test_client_hanging_up_is_logged_and_the_server_goes_on(server):
    with socket.create_connection(("127.0.0.1", server["port"])) as sock:
        sock.sendall(b"GET /big.tar.gz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.0 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    assert _log_has(server["log"], "went away")
    assert "Traceback" not in server["log"].read_text()
    assert http("GET", server["url"] + "/b.tar.gz")[0] == 200


def test_no_traversal_and_no_listing(server):
    url = server["url"]
    assert http("GET", url + "/../secret.txt")[0] == 404
    assert http("GET", url + "/%2e%2e/secret.txt")[0] == 404
    assert http("GET", url + "/..%2fsecret.txt")[0] == 404
    assert http("GET", url + "/link.tar.gz")[0] == 404
    assert http("GET", url + "/")[0] == 404
    assert http("GET", url + "/missing.tar.gz")[0] == 404


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_path_as_is_traversal(server):
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is",
                             server["url"] + "/../../../../etc/passwd"], capture_output=True, text=True, timeout=30)
    assert result.stdout == "404"


def test_parse_range():
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range(" bytes = 2 - ", 10) == (2, 9)
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("bytes=0-1,3-4", 10) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=10-", 10)
