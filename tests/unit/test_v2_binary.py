"""edged.v2_binary: requests and responses made from a remembered JSON header must be
exactly what decode_request and encode_response make of the same bytes."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.dataplane import InferenceResponse
from edged.errors import InvalidInput
from edged.v2 import decode_request, encode_response
from edged.v2_binary import MAX_LAYOUTS, BinaryLayouts, BinaryResponses


def _binary(arrays: dict[str, np.ndarray], **extra) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [{"name": n, "shape": list(a.shape), "datatype": {"float32": "FP32", "int8": "INT8",
                                                                                    "int64": "INT64"}[a.dtype.name],
                                   "parameters": {"binary_data_size": a.nbytes}} for n, a in arrays.items()],
                       **extra}).encode()
    return head + b"".join(a.tobytes() for a in arrays.values()), len(head)


def _same(a, b) -> None:
    assert (a.request.model, a.request.version, a.request.outputs, a.request.id, a.request.parameters) == (
        b.request.model, b.request.version, b.request.outputs, b.request.id, b.request.parameters)
    assert a.binary_outputs == b.binary_outputs and a.all_binary == b.all_binary
    assert list(a.request.inputs) == list(b.request.inputs)
    for name, array in a.request.inputs.items():
        other = b.request.inputs[name]
        assert array.dtype == other.dtype and array.shape == other.shape
        np.testing.assert_array_equal(array, other)


def test_a_learnt_header_decodes_the_next_body_as_decode_request_does():
    layouts = BinaryLayouts()
    first = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int8)}
    extra = {"id": 7, "parameters": {"binary_data_output": True},
             "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]}
    body, length = _binary(first, **extra)
    assert layouts.decode("m", None, body, length) is None  # not learnt yet
    layouts.learn(body, length, decode_request("m", None, body, length))
    second = {"a": np.full((2, 3), 2.5, np.float32), "b": np.array([3, 4], np.int8)}
    body2, length2 = _binary(second, **extra)
    assert length2 == length
    made = layouts.decode("m", "2.0.0", bytearray(body2), length)
    assert made is not None
    _same(made, decode_request("m", "2.0.0", bytearray(body2), length))
    assert made.request.id == "7" and made.request.outputs == ["y", "z"] and made.binary_outputs == {"y"}
    made.request.parameters["x"] = 1  # each request has its own parameters
    assert "x" not in layouts.decode("m", None, body2, length).request.parameters


def test_other_bytes_after_the_header_or_another_header_are_decoded_afresh():
    layouts = BinaryLayouts()
    body, length = _binary({"a": np.zeros(4, np.float32)})
    layouts.learn(body, length, decode_request("m", None, body, length))
    assert layouts.decode("m", None, body + b"\0\0\0\0", length) is None  # the full decode names the mismatch
    with pytest.raises(InvalidInput, match="bytes of binary data but inputs declare"):
        decode_request("m", None, body + b"\0\0\0\0", length)
    other, other_length = _binary({"a": np.zeros(5, np.float32)})
    assert layouts.decode("m", None, other, other_length) is None


def test_json_data_inputs_and_empty_tensors_are_not_learnt():
    layouts = BinaryLayouts()
    head = json.dumps({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                                  {"name": "b", "shape": [1], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    body = head + np.ones(1, np.float32).tobytes()
    layouts.learn(body, len(head), decode_request("m", None, body, len(head)))
    empty, length = _binary({"a": np.zeros((0, 3), np.float32), "b": np.ones(2, np.float32)})
    layouts.learn(empty, length, decode_request("m", None, empty, length))
    assert len(layouts) == 0


def test_at_most_max_layouts_are_kept():
    layouts = BinaryLayouts()
    for n in range(1, MAX_LAYOUTS + 5):
        body, length = _binary({"a": np.zeros(n, np.float32)})
        layouts.learn(body, length, decode_request("m", None, body, length))
        assert 1 <= len(layouts) <= MAX_LAYOUTS


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       request_id=st.one_of(st.none(), st.text(max_size=5)), all_binary=st.booleans())
def test_layout_decode_matches_for_any_shape(shape, seed, request_id, all_binary):
    rng = np.random.default_rng(seed)
    extra = {"parameters": {"binary_data_output": all_binary}}
    if request_id is not None:
        extra["id"] = request_id
    layouts = BinaryLayouts()
    body, length = _binary({"x": rng.standard_normal(shape).astype(np.float32), "k": np.arange(3, dtype=np.int64)}, **extra)
    layouts.learn(body, length, decode_request("m", None, body, length))
    body2, _ = _binary({"x": rng.standard_normal(shape).astype(np.float32), "k": np.arange(3, dtype=np.int64) * 5}, **extra)
    _same(layouts.decode("m", None, body2, length), decode_request("m", None, body2, length))


def _response(outputs: dict[str, np.ndarray], response_id: str | None = None) -> InferenceResponse:
    return InferenceResponse(model="m", version="1.0.0", outputs=outputs, id=response_id)


@pytest.mark.parametrize("binary_outputs,all_binary", [(set(), True), ({"y", "z"}, False), ({"y"}, False), (set(), False)])
def test_responses_are_the_bytes_encode_response_writes(binary_outputs, all_binary):
    responses = BinaryResponses()
    for step in range(3):
        outputs = {"y": np.arange(4, dtype=np.float32).reshape(2, 2) * step, "z": np.array([step], np.int64)}
        for response_id in (None, "r1"):
            response = _response(outputs, response_id)
            assert responses.encode(response, binary_outputs, all_binary) == encode_response(
                response, binary_outputs, all_binary)
    # a new shape or dtype gets its own header
    for outputs in ({"y": np.zeros((3, 2), np.float32), "z": np.array([1], np.int64)},
                    {"y": np.zeros((2, 2), np.float64), "z": np.array([1], np.int64)},
                    {"y": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), "z": np.array([1], np.int64)}):
        response = _response(outputs)
        assert responses.encode(response, binary_outputs, all_binary) == encode_response(
            response, binary_outputs, all_binary)


def test_a_single_output_response_is_the_bytes_encode_response_writes():
    responses = BinaryResponses()
    for outputs in ({"y": np.arange(10, dtype=np.float32).reshape(1, 10)}, {"y": np.ones((1, 10), np.float32)},
                    {"y": np.ones((2, 10), np.float32)}, {"w": np.ones((1, 10), np.float32)},
                    {"y": np.ones((1, 10), np.int8)}):
        for response_id in (None, "7"):
            response = _response(outputs, response_id)
            for binary_outputs, all_binary in ((set(), True), (set(outputs), False), (set(), False)):
                assert responses.encode(response, binary_outputs, all_binary) == encode_response(
                    response, binary_outputs, all_binary)


@pytest.mark.parametrize("outputs", [None, [{"name": "y"}]])
def test_a_single_input_request_decodes_as_decode_request_does(outputs):
    layouts = BinaryLayouts()
    extra = {"outputs": outputs} if outputs else {}
    body, length = _binary({"x": np.zeros((1, 1, 8, 8), np.float32)}, **extra)
    layouts.learn(body, length, decode_request("m", None, body, length))
    body2, _ = _binary({"x": np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)}, **extra)
    made = layouts.decode("m", "", bytearray(body2), length)
    _same(made, decode_request("m", "", bytearray(body2), length))
    assert made.request.version is None
