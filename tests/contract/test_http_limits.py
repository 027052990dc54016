"""Resource bounds of the HTTP server against a real `edged serve`: big bodies
decoded off the event loop, the in-flight byte budget, header/body/idle timeouts,
the connection limit, memory handed back, and rate-limited log lines.

No assertion is on time: each test asserts states and counters, with generous
bounds on how long it waits for them."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from edged.config import HttpConfig
from edged.http_limits import RateLimitFilter
from tests.helpers import REPO, http, start_daemon

MODEL = "digits-onnx"
INFER = f"/v2/models/{MODEL}/infer"
WAIT = 60.0  # the longest any test waits for a state


def metric(daemon, name: str, labels: str = "") -> float | None:
    """The value of ``name{labels}`` in the daemon's /metrics, None when absent."""
    _, raw, _ = http("GET", daemon.url + "/metrics", timeout=30)
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(r"^" + pattern + r"$", raw.decode(), re.MULTILINE)
    return float(found.group(1)) if found else None


def wait_until(check, what: str, timeout: float = WAIT, daemon=None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}" + (f"\n{daemon.logs()[-3000:]}" if daemon else ""))
        time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def big_json_body(nbytes: int) -> bytes:
    """A well-formed V2 request of about ``nbytes`` whose tensor does not fit the model:
    the daemon decodes all of it, then answers 400."""
    count = nbytes // 4
    data = b"0.5," * (count - 1) + b"0.5"
    return b'{"inputs":[{"name":"input","shape":[%d],"datatype":"FP32","data":[' % count + data + b"]}]}"


def raw_connection(daemon, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT)
    if payload:
        sock.sendall(payload)
    return sock


def closed_by_server(sock: socket.socket, deadline: float | None = None) -> bool:
    """Blocks until the server closes the connection (True) or ``deadline`` (a
    time.monotonic() value, default WAIT from now) passes (False)."""
    deadline = time.monotonic() + WAIT if deadline is None else deadline
    try:
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest[:length])


def post_headers(length: int, path: str = INFER) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# -- the event loop keeps answering; memory goes back ------------------------------------
@pytest.fixture(scope="module")
def daemon(demo_bundles, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("limits"), demo_bundles, env={"EDGED_LOAD": MODEL})
    yield proc
    assert proc.stop() == 0, proc.logs()


def _send_big(daemon, body: bytes, results: list) -> None:
    try:
        status, raw, _ = http("POST", daemon.url + INFER, body, {"Content-Type": "application/json"}, timeout=300)
        results.append((status, json.loads(raw)))
    except Exception as exc:  # noqa: BLE001 - reported by the test
        results.append((None, repr(exc)))


def test_live_answers_while_three_big_bodies_decode(daemon):
    """Defect 2: decoding ran on the event loop, so /v2/health/live stalled for seconds.
    Proof that it now answers during the decodes: /metrics (served by the loop) shows a
    decode in progress before and after a live call, and no new decode started in
    between -- so one decode ran across the whole live call."""
    limit = HttpConfig().max_body_bytes
    body = big_json_body(limit - 4096)
    assert len(body) <= limit
    results: list = []
    senders = [threading.Thread(target=_send_big, args=(daemon, body, results)) for _ in range(3)]
    for sender in senders:
        sender.start()
    proved = False
    deadline = time.monotonic() + 300
    while not proved and any(s.is_alive() for s in senders) and time.monotonic() < deadline:
        before = (metric(daemon, "edged_http_codec_in_progress"), metric(daemon, "edged_http_offloaded_total", 'what="decode"'))
        assert before[0] is not None, "no edged_http_codec_in_progress metric: bodies are not decoded in worker threads"
        if not before[0]:
            time.sleep(0.02)
            continue
        status, raw, _ = http("GET", daemon.url + "/v2/health/live", timeout=30)
        after = (metric(daemon, "edged_http_codec_in_progress"), metric(daemon, "edged_http_offloaded_total", 'what="decode"'))
        proved = status == 200 and json.loads(raw) == {"live": True} and after[0] >= 1 and after[1] == before[1]
    for sender in senders:
        sender.join(300)
    assert proved, f"never saw /v2/health/live answer during a decode; results: {results}"
    assert [r[0] for r in results] == [400, 400, 400], results  # decoded in full, then refused by the model's shape
    assert all("input input" in r[1]["error"] for r in results), results
    assert metric(daemon, "edged_http_offloaded_total", 'what="decode"') >= 3


def test_memory_is_given_back_after_big_requests(daemon):
    """Defect 7: after three near-limit requests RSS stayed 2.5x higher for 20 minutes."""
    small = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    assert daemon.post(INFER, small)[0] == 200
    trims = metric(daemon, "edged_http_memory_trims_total") or 0
    baseline = rss_bytes(daemon.proc.pid)
    body = big_json_body(HttpConfig().max_body_bytes - 4096)
    for _ in range(3):
        results: list = []
        _send_big(daemon, body, results)
        assert results[0][0] == 400, results
    del body
    wait_until(lambda: (metric(daemon, "edged_http_memory_trims_total") or 0) > trims, "memory handed back (trim)", daemon=daemon)
    wait_until(lambda: rss_bytes(daemon.proc.pid) <= baseline * 1.2,
               f"RSS back within 20% of {baseline / 1e6:.0f} MB (now {rss_bytes(daemon.proc.pid) / 1e6:.0f} MB)", daemon=daemon)


# -- bytes in flight, timeouts, connections ------------------------------------------------
@pytest.fixture(scope="module")
def tight(demo_bundles, tmp_path_factory):
    """A daemon with short timeouts."""
    proc = start_daemon(tmp_path_factory.mktemp("tight"), demo_bundles, env={
        "EDGED_LOAD": MODEL,
        "EDGED_HTTP_HEADER_TIMEOUT_S": "1",
        "EDGED_HTTP_BODY_TIMEOUT_S": "1",
        "EDGED_HTTP_IDLE_TIMEOUT_S": "1",
    })
    yield proc
    assert proc.stop() == 0, proc.logs()


def test_inflight_budget_refuses_with_503_and_recovers(demo_bundles, tmp_path):
    tight = start_daemon(tmp_path, demo_bundles, env={
        "EDGED_LOAD": MODEL,
        "EDGED_HTTP_MAX_BODY_BYTES": str(1024 * 1024),
        "EDGED_HTTP_MAX_INFLIGHT_BYTES": str(2 * 1024 * 1024),  # two full-size bodies hold all of it
    })
    try:
        _budget_refuses_and_recovers(tight)
    finally:
        assert tight.stop() == 0, tight.logs()


def _budget_refuses_and_recovers(tight) -> None:
    # Two requests that announce full-size bodies and send no more hold the whole budget.
    holders = [raw_connection(tight, post_headers(1024 * 1024) + b'{"inputs": [') for _ in range(2)]
    try:
        wait_until(lambda: (metric(tight, "edged_http_inflight_bytes") or 0) >= 2 * 1024 * 1024, "budget held", daemon=tight)
        status, body = tight.post(INFER, {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})
        assert status == 503 and body["code"] == "overloaded", body
        assert "http.max_inflight_bytes" in body["error"] and "retry" in body["error"], body
        assert metric(tight, "edged_http_refused_total", 'reason="inflight_bytes"') >= 1
    finally:
        for holder in holders:
            holder.close()
    wait_until(lambda: metric(tight, "edged_http_inflight_bytes") == 0, "budget released", daemon=tight)
    status, body = tight.post(INFER, {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})
    assert status == 200, body


def test_slow_body_gets_408(tight):
    sock = raw_connection(tight, post_headers(1000) + b'{"inputs": [')
    try:
        status, body = read_response(sock)
    finally:
        sock.close()
    assert status == 408 and body["code"] == "request_timeout" and "http.body_timeout_s" in body["error"], body


def test_slowloris_connections_are_closed(tight):
    """Defect 3: connections that never finish their headers stayed open."""
    before = metric(tight, "edged_http_refused_total", 'reason="header_timeout"') or 0
    socks = [raw_connection(tight, b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n") for _ in range(30)]
    try:
        deadline = time.monotonic() + WAIT  # one bound for all of them
        assert all(closed_by_server(s, deadline) for s in socks)
    finally:
        for sock in socks:
            sock.close()
    assert metric(tight, "edged_http_refused_total", 'reason="header_timeout"') >= before + 30
    assert tight.get("/v2/health/live")[0] == 200


def test_idle_keepalive_connections_are_closed(tight):
    sock = raw_connection(tight, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        status, body = read_response(sock)
        assert status == 200 and body == {"live": True}
        assert closed_by_server(sock)  # kept alive, then closed once idle
    finally:
        sock.close()


def test_connection_limit_answers_503(demo_bundles, tmp_path):
    """Defect 3: 1,100 idle connections used up every file descriptor and locked
    every client out, with a flood of log lines."""
    crowded = start_daemon(tmp_path, demo_bundles, env={"EDGED_LOAD": MODEL, "EDGED_HTTP_MAX_CONNECTIONS": "40"})
    try:
        idle = [raw_connection(crowded) for _ in range(45)]  # more than http.max_connections
        try:
            probe = raw_connection(crowded, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # accepted after them
            try:
                status, body = read_response(probe)
            finally:
                probe.close()
            assert status == 503 and body["code"] == "overloaded" and "http.max_connections" in body["error"], body
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: _answers(crowded), "served again once the idle connections went", daemon=crowded)
        assert metric(crowded, "edged_http_refused_total", 'reason="connections"') >= 1
        assert any("HTTP connection refused" in line for line in crowded.logs().splitlines())
    finally:
        assert crowded.stop() == 0, crowded.logs()


def _answers(daemon) -> bool:
    try:
        return http("GET", daemon.url + "/v2/health/live", timeout=10)[0] == 200
    except OSError:
        return False


# -- log rate limiting, the unit's file limit ---------------------------------------------
def test_same_error_logged_at_most_once_a_second_with_a_count():
    now = [100.0]
    limiter = RateLimitFilter(interval=1.0, clock=lambda: now[0])

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("edged.transports.http", level, __file__, 1, msg, None, None)

    passed = [limiter.filter(record("accept failed")) for _ in range(500)]
    assert passed.count(True) == 1
    assert limiter.filter(record("another error"))  # a different message has its own second
    assert limiter.filter(record("debug noise", logging.INFO))  # below WARNING: never limited
    now[0] += 1.01
    nxt = record("accept failed")
    assert limiter.filter(nxt) and "499 more like this" in nxt.getMessage()
    assert not limiter.filter(record("accept failed"))


def test_unit_raises_the_open_file_limit():
    unit = (REPO / "systemd" / "edged.service").read_text()
    found = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert found and int(found.group(1)) >= HttpConfig().max_connections + 1024, "LimitNOFILE too low for http.max_connections"
