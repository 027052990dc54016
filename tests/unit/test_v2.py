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


def test_binary_inputs_are_shaped_views_of_the_body():
    a = np.arange(6, dtype=np.float32)
    b = np.arange(4, dtype=np.int16)
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
        {"name": "e", "shape": [0, 3], "datatype": "FP32", "parameters": {"binary_data_size": 0}},
        {"name": "b", "shape": [4], "datatype": "INT16", "parameters": {"binary_data_size": b.nbytes}},
    ]}).encode()
    body = bytearray(head + a.tobytes() + b.tobytes())
    inputs = decode_request("m", None, body, len(head)).request.inputs
    np.testing.assert_array_equal(inputs["a"], a.reshape(2, 3))
    np.testing.assert_array_equal(inputs["b"], b)
    assert inputs["e"].shape == (0, 3) and inputs["e"].dtype == np.float32
    assert inputs["a"].flags.writeable  # a runtime may write into its input, as before
    assert np.shares_memory(inputs["a"], np.frombuffer(body, np.uint8))  # no copy of the tensor bytes


def test_datatype_maps_accept_dtype_objects_and_names():
    from edged.tensors import numpy_dtype, v2_datatype

    assert v2_datatype(np.dtype("float32")) == v2_datatype("float32") == v2_datatype(np.dtype(">f4")) == "FP32"
    assert numpy_dtype("FP16") == np.dtype("float16")
    with pytest.raises(InvalidInput, match="no KServe V2 datatype"):
        v2_datatype(np.dtype("complex64"))
    with pytest.raises(InvalidInput, match="unknown datatype"):
        numpy_dtype(["FP32"])  # type: ignore[arg-type]
