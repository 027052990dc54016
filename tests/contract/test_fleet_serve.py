"""`edged fleet serve` against curl and urllib: full GET, Range (206), suffix
ranges, 416, HEAD, and no way out of the served directory."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.brokers import wait_port
from tests.helpers import REPO, free_port, http


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    served = root / "served"
    served.mkdir()
    (root / "secret.txt").write_text("not for you")
    data = bytes(range(256)) * 400  # 102400 bytes
    (served / "b.tar.gz").write_bytes(data)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edged.cli", "fleet", "serve", str(served), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    yield f"http://127.0.0.1:{port}", data
    proc.terminate()
    proc.wait(10)


def test_full_get_and_head(server):
    url, data = server
    status, body, headers = http("GET", url + "/b.tar.gz")
    assert status == 200 and body == data
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Length"] == str(len(data))
    status, body, headers = http("HEAD", url + "/b.tar.gz")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))


def test_ranges(server):
    url, data = server
    status, body, headers = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    status, body, _ = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=100000-"})
    assert status == 206 and body == data[100000:]
    status, body, _ = http("GET", url + "/b.tar.gz", headers={"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, _, headers = http("GET", url + "/b.tar.gz", headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_resumes_a_partial_file(server, tmp_path):
    url, data = server
    out = tmp_path / "b.tar.gz"
    out.write_bytes(data[:5000])  # what an interrupted download left
    subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(out), url + "/b.tar.gz"], check=True, timeout=30)
    assert out.read_bytes() == data


def test_no_traversal_and_no_listing(server):
    url, _ = server
    assert http("GET", url + "/../secret.txt")[0] == 404
    assert http("GET", url + "/%2e%2e/secret.txt")[0] == 404
    assert http("GET", url + "/")[0] == 404
    assert http("GET", url + "/missing.tar.gz")[0] == 404
