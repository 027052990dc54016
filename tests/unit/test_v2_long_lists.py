"""Long flat ``data`` lists take a fast path (found with bytes.find, parsed in
pieces, in place); it must decide exactly what the plain parse decides.

The thresholds are made small here, so short bodies take the fast path and are
cut into many pieces."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged import v2
from edged.errors import InvalidInput
from edged.v2 import decode_request
from tests.unit.v2_outcome import outcome, plain


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(v2, "FAST_DATA_MIN_BYTES", 8)
    monkeypatch.setattr(v2, "FAST_DATA_CHUNK_BYTES", 16)


def _same(fast, plain) -> None:
    assert fast[0] == plain[0], (fast, plain)
    if fast[0] == "ok":
        assert fast[1].keys() == plain[1].keys()
        for name, array in fast[1].items():
            assert array.dtype == plain[1][name].dtype and array.shape == plain[1][name].shape
            np.testing.assert_array_equal(array, plain[1][name])


def _body(tensors: list[dict], separator: str = ",") -> bytes:
    return json.dumps({"inputs": tensors}, separators=(separator, ":")).encode()


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "INT32", "INT64", "UINT8", "INT8", "BOOL"])
def test_long_lists_decode_as_the_plain_parse_does(small_pieces, datatype):
    values = [0.5, -1.25e3, 3, 1e-7, 42, -0.0, 6.02e3, 7] * 5 if datatype.startswith("FP") else [0, 1, 2, 7, 100, 3, 1, 0] * 5
    raw = bytearray(_body([{"name": "x", "shape": [40], "datatype": datatype, "data": values}], ", "))
    before = bytes(raw)
    fast = outcome(raw)
    assert bytes(raw) == before  # the brackets patched in for each piece were put back
    _same(fast, plain(before))
    assert fast[0] == "ok"


def test_two_long_lists_a_short_one_and_binary_data_after_the_json(small_pieces):
    a, b = np.linspace(-1, 1, 30, dtype=np.float32), np.arange(25, dtype=np.int32)
    head = _body([{"name": "a", "shape": [30], "datatype": "FP32", "data": a.tolist()},
                  {"name": "s", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                  {"name": "bin", "shape": [2], "datatype": "INT8", "parameters": {"binary_data_size": 2}},
                  {"name": "b", "shape": [5, 5], "datatype": "INT32", "data": b.tolist()}])
    body = head + b"\x01\x02"
    status, inputs = outcome(body, len(head))
    assert status == "ok"
    np.testing.assert_array_equal(inputs["a"], a)
    np.testing.assert_array_equal(inputs["b"], b.reshape(5, 5))
    np.testing.assert_array_equal(inputs["bin"], [1, 2])
    _same((status, inputs), plain(body, len(head)))


@pytest.mark.parametrize("data", ["1.2.3", "1e", "--1", "1,,2", "1, 2,", ".5", "0x10", "1 2", "NaN", "Infinity", "+1", "01"])
def test_a_malformed_number_is_a_400_naming_the_tensor(small_pieces, data):
    text = ", ".join(["1.5"] * 20 + [data] + ["2.5"] * 20)
    raw = bytearray(b'{"inputs":[{"name":"pixels","shape":[41],"datatype":"FP32","data":[%s]}]}' % text.encode())
    before = bytes(raw)
    with pytest.raises(InvalidInput, match="malformed JSON in request body") as caught:
        decode_request("m", None, raw, None)
    assert "input pixels: 'data' is not a list of numbers" in caught.value.message
    assert bytes(raw) == before
    assert plain(before)[0] == "error"


@pytest.mark.parametrize("item", ["null", "true", "false", '"1.5"', "[1]", '{"a":1}', "{}", "[]", "nul", "tru"])
def test_lists_with_other_json_values_decide_as_the_plain_parse(small_pieces, item):
    """Strings and nested lists take the plain parse; true, false, null and {} take the pieces."""
    text = ", ".join(["1.5"] * 20 + [item] + ["2.5"] * 20)
    raw = b'{"inputs":[{"name":"x","shape":[41],"datatype":"FP32","data":[%s]}]}' % text.encode()
    _same(outcome(raw), plain(raw))


@pytest.mark.parametrize("where", [
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2],"parameters":{"data":[%s]}}]}',
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}],"parameters":{"data":[%s]}}',
    b'{"id":"a\\"data","inputs":[{"name":"k\\"data","shape":[2],"datatype":"FP32","data":[1,2]}],"x":{"data" :  [%s]}}',
    b'{"inputs":[{"name":"x","shape":[40],"datatype":"FP32","data" : [%s]}]}',
    b'{"inputs":[{"name":"x","shape":[40],"datatype":"FP32","data"\n:\t[%s]}]}',
    b'{"inputs":[{"name":"x","shape":[40],"datatype":"FP32","data":[%s]',  # cut short
    b'{"inputs":[{"name":"x","shape":[40],"datatype":"FP32","data":[%s]}]}trailing',
    b'{"inputs":[{"name":"x","shape":[39],"datatype":"FP32","data":[%s]}]}',  # count mismatch
])
def test_data_keys_elsewhere_and_odd_layouts_decide_as_the_plain_parse(small_pieces, where):
    raw = where % ", ".join(str(i / 4) for i in range(40)).encode()
    _same(outcome(raw), plain(raw))


numbers = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=32))
damage = st.sampled_from(["", "", "x", ".", "-", "e", ",", "]", "[", '"', "t", "n", " ", "0", "1e9", "\n", "}"])


@settings(max_examples=300, deadline=None, database=None)
@given(values=st.lists(numbers, min_size=1, max_size=60), datatype=st.sampled_from(["FP32", "FP64", "INT64", "INT16"]),
       at=st.integers(0, 10_000), cut=damage, separator=st.sampled_from([",", ", ", " ,\n"]))
def test_fuzz_the_fast_path_decides_as_the_plain_parse(values, datatype, at, cut, separator):
    saved = v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES
    v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES = 8, 16
    try:
        text = separator.join(json.dumps(v) for v in values)
        at %= len(text) + 1
        text = text[:at] + cut + text[at:]
        raw = bytearray(b'{"inputs":[{"name":"t","shape":[%d],"datatype":"%s","data":[%s]}]}'
                        % (len(values), datatype.encode(), text.encode()))
        before = bytes(raw)
        fast = outcome(raw)
        assert bytes(raw) == before
    finally:
        v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES = saved
    _same(fast, plain(before))


def test_a_real_size_body_decodes(monkeypatch):
    """The CNN body of the peers benchmark (3 MB): default thresholds, many pieces."""
    image = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    raw = bytearray(_body([{"name": "input", "shape": list(image.shape), "datatype": "FP32", "data": image.ravel().tolist()}]))
    assert len(raw) > 4 * v2.FAST_DATA_CHUNK_BYTES
    status, inputs = outcome(raw)
    assert status == "ok"
    np.testing.assert_array_equal(inputs["input"], image)
