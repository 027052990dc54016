"""edged.transports.http_fast.parse and render: which requests the lean path reads
itself, which it leaves to aiohttp (None), and which are still arriving."""

from __future__ import annotations

import re

import pytest

from edged.transports.http_fast import MORE_HEAD, parse, render

LIMIT = 64 * 1024


def request(path: str = "/v2/models/m/infer", headers: str = "", body: bytes = b"{}", length: int | None = None,
            line: str | None = None) -> bytes:
    line = line or f"POST {path} HTTP/1.1"
    size = len(body) if length is None else length
    return (f"{line}\r\nHost: x\r\n{headers}Content-Length: {size}\r\n\r\n").encode() + body


def test_a_plain_infer_request_is_read_with_its_body():
    raw = request(headers="Inference-Header-Content-Length: 2\r\nAuthorization:  Bearer t \r\n", body=b"{}xyz")
    parsed = parse(raw + b"GET /next", LIMIT)
    assert parsed is not None and not isinstance(parsed, int)
    lean, used = parsed
    assert used == len(raw)
    assert (lean.model, lean.version, bytes(lean.body)) == ("m", None, b"{}xyz")
    assert lean.headers[b"inference-header-content-length"] == b"2"
    assert lean.headers[b"authorization"] == b"Bearer t"


def test_a_versioned_path_names_the_version():
    lean, _ = parse(request("/v2/models/digits-onnx/versions/1.0.0/infer"), LIMIT)
    assert (lean.model, lean.version) == ("digits-onnx", "1.0.0")


@pytest.mark.parametrize("raw", [
    request("/v2/models/m/ready"),  # another route
    request("/v2/models/m/infer?x=1"),  # a query string
    request("/v2/models/%6d/infer"),  # percent-encoding: aiohttp decodes it
    request("/v2/models/../infer"),  # a dot segment: aiohttp normalizes it
    request("/v2/models/./infer"),
    request(line="POST /v2/models/m/infer HTTP/1.0"),  # HTTP/1.0 keep-alive rules
    request(line="post /v2/models/m/infer HTTP/1.1"),
    request(line="POST http://x/v2/models/m/infer HTTP/1.1"),  # absolute form
    request(headers="Transfer-Encoding: chunked\r\n"),
    request(headers="Content-Encoding: gzip\r\n"),  # aiohttp decompresses it
    request(headers="Expect: 100-continue\r\n"),
    request(headers="Connection: close\r\n"),
    request(headers="Connection: upgrade\r\nUpgrade: h2c\r\n"),
    request(headers="Content-Length: 2\r\n"),  # twice
    request(headers="Accept: a\r\naccept: b\r\n"),  # any header twice
    request(headers=" folded\r\n"),  # obs-fold
    request(headers="Bad Name: x\r\n"),
    request(headers="X: caf\xe9\r\n".encode("latin-1").decode("latin-1")),  # not visible ASCII
    request(length=-1),
    request(body=b"x" * 10, length=LIMIT + 1),  # over the limit: aiohttp streams it or answers 413
    b"\r\n" + request(),  # a leading empty line
    b"GET /v2/health/live HTTP/1.1\r\n\r\n",
    b"GET /v2/heal",  # the start of another method
    b"POST /v2/models/m/infer HTTP/1.1\nHost: x\nContent-Length: 0\n\n",  # bare LF line ends
])
def test_anything_else_is_left_to_aiohttp(raw):
    assert parse(raw, LIMIT) is None


def test_content_length_is_required():
    assert parse(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n", LIMIT) is None
    assert parse(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", LIMIT) is None


def test_a_request_still_arriving_says_how_much_of_it_is_here():
    raw = request(body=b"0123456789")
    assert parse(raw[:3], LIMIT) == MORE_HEAD
    assert parse(raw[:20], LIMIT) == MORE_HEAD
    head = raw.index(b"\r\n\r\n") + 4
    assert parse(raw[:head], LIMIT) == 0
    assert parse(raw[:head + 4], LIMIT) == 4
    assert parse(raw, LIMIT)[1] == len(raw)


def test_a_head_that_never_ends_is_left_to_aiohttp():
    assert parse(b"POST /v2/models/m/infer HTTP/1.1\r\nX: " + b"a" * 9000, LIMIT) is None


def test_render_writes_what_aiohttp_writes():
    raw = render(200, [("Inference-Header-Content-Length", "2"), ("Content-Type", "application/octet-stream")], b"{}ab")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert lines[1:4] == [b"Inference-Header-Content-Length: 2", b"Content-Type: application/octet-stream",
                          b"Content-Length: 4"]
    assert re.fullmatch(rb"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", lines[4])
    assert lines[5].startswith(b"Server: Python/") and b"aiohttp/" in lines[5]
    assert body == b"{}ab"
    assert render(503, [], b"").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


def test_a_head_that_cannot_become_lean_is_left_to_aiohttp_at_once():
    assert parse(b"POST /v2/models/m/ready HTTP/1.1\r\nHost", LIMIT) is None
    assert parse(b"POST /v2/models/m/infer HTTP/1.1\nHost", LIMIT) is None
    assert parse(b"POST /v2/models/m/infer HTTP/1.1\r\nHost", LIMIT) == MORE_HEAD


def test_the_ready_made_answers_are_what_render_writes():
    from edged.transports.http_fast import answer_bytes

    def undated(raw: bytes) -> bytes:  # the two may straddle a second
        return re.sub(rb"\r\nDate: [^\r]*", b"", raw)

    assert undated(answer_bytes(b'{"a":1}', None)) == undated(
        render(200, [("Content-Type", "application/json")], b'{"a":1}'))
    assert undated(answer_bytes(b"{}ab", 2)) == undated(render(
        200, [("Inference-Header-Content-Length", "2"), ("Content-Type", "application/octet-stream")], b"{}ab"))


def test_requests_are_read_at_an_offset_without_slicing():
    one = request(body=b"{}")
    two = request("/v2/models/n/infer", body=b"[1]")
    buffer = one + two + two[:10]
    first, at = parse(buffer, LIMIT)
    second, end = parse(buffer, LIMIT, at)
    assert (first.model, bytes(first.body), second.model, bytes(second.body)) == ("m", b"{}", "n", b"[1]")
    assert end == len(one + two)
    assert parse(buffer, LIMIT, end) == MORE_HEAD
    assert parse(one + b"GET / HTTP/1.1\r\n\r\n", LIMIT, len(one)) is None


def test_frame_finds_the_end_of_a_plain_request_of_any_route():
    from edged.transports.http_fast import frame

    get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    post = request("/v2/repository/index", body=b'{"ready":true}')
    assert frame(get + post, 0, LIMIT) == len(get)
    assert frame(get + post, len(get), LIMIT) == len(get + post)
    assert frame(post[:-1], 0, LIMIT) is None  # not all here
    assert frame(request(headers="Transfer-Encoding: chunked\r\n"), 0, LIMIT) is None
    assert frame(request(headers="Connection: close\r\n"), 0, LIMIT) is None
    assert frame(request(headers="Content-Length: 2\r\n"), 0, LIMIT) is None
    assert frame(b"GET /x HTTP/1.0\r\n\r\n", 0, LIMIT) is None
    assert frame(request(body=b"x" * 10, length=LIMIT + 1), 0, LIMIT) is None


def _outcome(parsed):
    if parsed is None or isinstance(parsed, int):
        return parsed
    lean, end = parsed
    return (lean.model, lean.version, dict(lean.headers), bytes(lean.body), lean.header_length), end


def test_the_header_length_field_is_read_with_the_head():
    lean, _ = parse(request(headers="Inference-Header-Content-Length: 2\r\n", body=b"{}ab"), LIMIT)
    assert lean.header_length == 2
    lean, _ = parse(request(headers="Inference-Header-Content-Length: x2\r\n", body=b"{}ab"), LIMIT)
    assert lean.header_length == -1  # not a number: the handler leaves it to aiohttp
    lean, _ = parse(request(body=b"{}"), LIMIT)
    assert lean.header_length is None


def test_a_remembered_head_reads_each_request_as_parse_does():
    from edged.transports.http_fast import MAX_HEADS, HeadCache

    cache = HeadCache(LIMIT)
    same = [request(headers="Inference-Header-Content-Length: 2\r\n", body=b"{}" + bytes([n, n])) for n in range(3)]
    others = [request("/v2/models/n/versions/2/infer", body=b"[9]"), request(body=b"x" * 10, length=LIMIT + 1),
              request("/v2/models/m/ready"), request(headers="Transfer-Encoding: chunked\r\n")]
    stream = b"".join(same + others + same)
    at = 0
    for raw in same + others + same:
        for cut in (3, len(raw) - 1, len(raw)):  # still arriving, then whole
            piece = stream[:at + cut]
            assert _outcome(cache.parse(piece, at)) == _outcome(parse(piece, LIMIT, at))
        at += len(raw)
    for n in range(MAX_HEADS + 3):  # many heads: at most MAX_HEADS kept, all still read right
        raw = request(f"/v2/models/m{n}/infer")
        assert _outcome(cache.parse(raw)) == _outcome(parse(raw, LIMIT))
        assert len(cache._heads) <= MAX_HEADS


def test_the_head_of_a_body_still_arriving_is_read_with_where_the_body_starts():
    from edged.transports.http_fast import HeadCache, parse_head

    raw = request("/v2/models/m/versions/2/infer", headers="Inference-Header-Content-Length: 2\r\n", body=b"{}" * 500)
    start = raw.index(b"\r\n\r\n") + 4
    head = parse_head(raw[:start + 10], LIMIT)
    assert (head.model, head.version, head.size, head.header_length, head.start) == ("m", "2", 1000, 2, start)
    assert parse(raw[:start + 10], LIMIT) == 10
    cache = HeadCache(LIMIT)
    assert cache.pending(b"xx" + raw[:start], 2) == head._replace(start=start + 2)
    assert cache.pending(raw[:start - 2]) is None  # the head is still arriving
    assert cache.pending(request(body=b"x", length=LIMIT + 1)[:-1]) is None  # over the limit: aiohttp's 413
    assert parse_head(request("/v2/models/m/ready"), LIMIT) is None


def test_a_budget_hold_that_does_not_fit_is_refused_without_counting():
    from edged.http_limits import InflightBudget

    refusals = []
    budget = InflightBudget(100, on_refused=lambda: refusals.append(1))
    hold = budget.try_hold(60)
    assert hold is not None and budget.used == 60
    assert budget.try_hold(41) is None and budget.used == 60 and refusals == []
    hold.release()
    assert budget.used == 0
