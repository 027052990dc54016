import json

import numpy as np
import pytest

from edged.dataplane import InferenceResponse
from edged.errors import InvalidInput
from edged.v2 import decode_request, encode_response


def test_json_and_binary_inputs_decode():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}]}).encode()
    decoded = decode_request("m", None, body, None)
    np.testing.assert_array_equal(decoded.request.inputs["x"], [[1, 2], [3, 4]])
    blob = np.arange(6, dtype=np.int8).tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT8", "parameters": {"binary_data_size": 6}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    decoded = decode_request("m", "1.0.0", head + blob, len(head))
    assert decoded.request.inputs["x"].dtype == np.int8
    assert decoded.binary_outputs == {"y"}


@pytest.mark.parametrize(
    "body,header,message",
    [
        (b"{not json", None, "malformed JSON"),
        (b"[]", None, "JSON object"),
        (json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}).encode(), None, "needs 3 elements, got 2"),
        (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP33", "data": [1]}]}).encode(), None, "unknown datatype"),
        (json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}).encode(), 0, "needs 8 bytes"),
    ],
)
def test_bad_requests_name_the_problem(body, header, message):
    if header == 0:
        header = len(body)
    with pytest.raises(InvalidInput, match=message):
        decode_request("m", None, body, header)


def test_binary_size_mismatch_is_refused():
    head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(InvalidInput, match="only 4 remain"):
        decode_request("m", None, head + b"\0" * 4, len(head))
    with pytest.raises(InvalidInput, match="12 bytes of binary data but inputs declare 8"):
        decode_request("m", None, head + b"\0" * 12, len(head))


def test_encode_binary_and_json_outputs():
    resp = InferenceResponse("m", "1.0.0", {"y": np.array([[1.5, 2.5]], np.float32)})
    body, length = encode_response(resp, set(), False)
    assert length is None and json.loads(body)["outputs"][0]["data"] == [1.5, 2.5]
    body, length = encode_response(resp, {"y"}, False)
    assert np.frombuffer(body[length:], np.float32).tolist() == [1.5, 2.5]
