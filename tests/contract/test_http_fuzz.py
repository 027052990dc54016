"""A bounded hypothesis fuzz of the HTTP transport: whatever a client sends, the
answer is never a 5xx, and an error body is V2 error JSON without Python
exception text. Defect 6: a 2,000-request fuzz found 102 answers of 500.

Bounded to well under a minute (HTTP_FUZZ_EXAMPLES requests, plus a faster
in-process fuzz of the decoder)."""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.parse

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz needs hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edged.errors import InvalidInput  # noqa: E402
from edged.v2 import decode_request  # noqa: E402
from tests.helpers import start_daemon  # noqa: E402

HTTP_EXAMPLES = int(os.environ.get("HTTP_FUZZ_EXAMPLES", "500"))
DECODER_EXAMPLES = int(os.environ.get("DECODER_FUZZ_EXAMPLES", "300"))
MODELS = ["digits-onnx", "digits-tflite", "digits-openvino"]
# What Python puts in exception text; none of it may reach a client.
PYTHON_TEXT = re.compile(r"Traceback|\b[A-Z][A-Za-z]*(Error|Exception)\b|object has no attribute|not iterable|"
                         r"not subscriptable|unhashable|NoneType|File \"")

DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BYTES", "fp32", "V0", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["binary_data_size", "binary_data", "binary_data_output"]),
)
anything = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                        max_leaves=5)
dims = st.one_of(st.integers(-3, 9), st.integers(2**31, 2**64), st.just(1), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3))
shapes = st.one_of(st.just([1, 1, 8, 8]), st.just([2, 1, 8, 8]), st.just([0, 1, 8, 8]), st.lists(dims, max_size=6), anything)
numbers = st.one_of(st.floats(allow_nan=False, width=32), st.integers(-(2**65), 2**65), st.booleans())
datas = st.one_of(
    st.builds(lambda n, v: [v] * n, st.sampled_from([0, 1, 63, 64, 65, 128, 70_000]), numbers),
    st.lists(numbers, max_size=8), st.lists(st.lists(numbers, max_size=3), max_size=3), anything,
)
parameters = st.one_of(st.none(), anything,
                       st.fixed_dictionaries({}, optional={"binary_data_size": st.one_of(st.integers(-8, 600), anything),
                                                           "binary_data": anything, "binary_data_output": anything}))


@st.composite
def tensors(draw):
    tensor: dict = {}
    for key, strategy in (("name", st.one_of(st.just("input"), st.text(max_size=6), anything)),
                          ("shape", shapes), ("datatype", st.one_of(st.sampled_from(DATATYPES), anything)),
                          ("data", datas), ("parameters", parameters)):
        if draw(st.integers(0, 9)) < 8:
            tensor[key] = draw(strategy)
    return tensor


@st.composite
def infer_bodies(draw):
    """(body bytes, Inference-Header-Content-Length or None)."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=64)), None
    request: dict = {"inputs": draw(st.one_of(st.lists(tensors(), min_size=1, max_size=2), anything))}
    for key, strategy in (("outputs", st.one_of(st.lists(st.fixed_dictionaries(
            {"name": st.one_of(st.just("logits"), st.text(max_size=4))}, optional={"parameters": parameters}), max_size=2), anything)),
            ("parameters", parameters), ("id", anything)):
        if draw(st.booleans()):
            request[key] = draw(strategy)
    head = json.dumps(request).encode()
    if kind == 1:  # cut short, or nested deep
        return (head[: draw(st.integers(0, len(head)))] if draw(st.booleans())
                else b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}"), None
    if kind <= 3:  # binary tensor data after the JSON
        blob = draw(st.one_of(st.binary(max_size=16), st.sampled_from([b"\0" * 256, b"\1" * 512])))
        header = draw(st.one_of(st.just(len(head)), st.integers(-5, len(head) + len(blob) + 5)))
        return head + blob, header
    return head, None


def check_answer(status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:500])
    if status >= 400:
        body = json.loads(raw)
        assert isinstance(body.get("error"), str) and body.get("code"), body
        assert not PYTHON_TEXT.search(body["error"]), body


@pytest.fixture(scope="module")
def daemon(demo_bundles, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("fuzz"), demo_bundles)
    yield proc
    assert proc.stop() == 0, proc.logs()


class Client:
    """One keep-alive connection, opened again whenever the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


FUZZ = settings(max_examples=HTTP_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@FUZZ
@given(model=st.one_of(st.sampled_from(MODELS), st.text(max_size=8)), version=st.one_of(st.none(), st.text(max_size=6)),
       request=infer_bodies(), header=st.one_of(st.none(), st.text(max_size=6)))
def test_fuzz_infer_never_5xx(daemon, model, version, request, header):
    body, header_length = request
    path = "/v2/models/" + urllib.parse.quote(model, safe="") if model else "/v2/models/x"
    if version is not None:
        path += "/versions/" + (urllib.parse.quote(version, safe="") or "v")
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    elif header is not None and header.isprintable() and header.isascii():
        headers["Inference-Header-Content-Length"] = header
    client = _client(daemon)
    check_answer(*client.request("POST", path + "/infer", body, headers))


@FUZZ
@given(path=st.sampled_from(["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{m}", "/v2/models/{m}/ready",
                             "/v2/models/{m}/config", "/v2/models/{m}/versions/{v}", "/v2/repository/index"]),
       model=st.one_of(st.sampled_from(MODELS), st.text(min_size=1, max_size=8)), version=st.text(min_size=1, max_size=5),
       body=st.one_of(st.binary(max_size=100), anything.map(lambda v: json.dumps(v).encode())))
def test_fuzz_metadata_and_repository_never_5xx(daemon, path, model, version, body):
    path = path.replace("{m}", urllib.parse.quote(model, safe="")).replace("{v}", urllib.parse.quote(version, safe=""))
    method = "POST" if path.endswith("/index") else "GET"
    status, raw = _client(daemon).request(method, path, body if method == "POST" else None)
    if path.endswith("/ready") and status == 503:
        return  # "not ready" is the answer, not a failure
    check_answer(status, raw)


_CLIENTS: dict[int, Client] = {}


def _client(daemon) -> Client:
    return _CLIENTS.setdefault(daemon.port, Client(daemon.port))


def test_daemon_survived_the_fuzz(daemon):
    assert daemon.alive()
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    assert daemon.post("/v2/models/digits-onnx/infer", body)[0] == 200
    assert "Traceback" not in daemon.logs()


@settings(max_examples=DECODER_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=infer_bodies())
def test_fuzz_decoder_raises_only_invalid_input(request):
    body, header_length = request
    try:
        decoded = decode_request("m", None, body, header_length)
    except InvalidInput as exc:
        assert not PYTHON_TEXT.search(exc.message), exc.message
    else:
        assert decoded.request.inputs
