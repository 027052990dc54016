"""Long float ``data`` lists read by simdjson (the fast-json extra) must decode to
the very bits, and fail with the very messages, of the orjson path
(``simd_json=False``) and of the plain parse of the whole body."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged import v2
from edged.json_numbers import SimdNumbers
from edged.v2 import parse_request_json
from tests.unit.v2_outcome import outcome, plain

pytest.importorskip("simdjson")


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()  # -0.0 and 0.0 differ here, NaN equals NaN


def _same(a, b, messages: bool = True) -> None:
    assert a[0] == b[0], (a, b)
    if a[0] == "error":
        assert a[1] == b[1] or not messages
        return
    assert a[1].keys() == b[1].keys()
    for name, array in a[1].items():
        other = b[1][name]
        assert (array.dtype, array.shape) == (other.dtype, other.shape)
        assert _bits(array) == _bits(other), name


def _decide_alike(body: bytes) -> tuple:
    """Decode ``body`` three ways (simdjson, orjson pieces, plain parse); all must agree
    (the first two to the word of an error).
    The body is given as a bytearray too, as HTTP reads it, and must be left as it was."""
    raw = bytearray(body)
    simd = outcome(raw)
    assert bytes(raw) == body  # the brackets patched in for each piece were put back
    _same(simd, outcome(body))
    _same(simd, outcome(bytearray(body), simd_json=False))
    _same(simd, plain(body), messages=False)  # the plain parse words its errors as orjson does
    return simd


def _request(text: str, count: int, datatype: str = "FP32", name: str = "x") -> bytes:
    return b'{"inputs":[{"name":"%s","shape":[%d],"datatype":"%s","data":[%s]}]}' % (
        name.encode(), count, datatype.encode(), text.encode())


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(v2, "FAST_DATA_MIN_BYTES", 8)
    monkeypatch.setattr(v2, "FAST_DATA_CHUNK_BYTES", 64)


def test_long_lists_carry_a_simdjson_parser_unless_told_not_to(small_pieces):
    body = _request(", ".join(["1.5"] * 40), 40)
    assert isinstance(parse_request_json(body)["inputs"][0]["data"].numbers, SimdNumbers)
    assert parse_request_json(body, simd_json=False)["inputs"][0]["data"].numbers is None


# Tokens as clients write them: float32 values printed as doubles (json.dumps of
# tolist()) and shortest float32 repr, integers (mixed in), exponents, negative zero,
# integers past 2**53 and at the 64-bit edges, subnormals, underflow to zero.
TOKENS = ["0.5118216276168823", "0.1", "1", "-0", "-0.0", "0.0", "0", "-1.25e3", "6.02E23", "1e-7", "1E+2",
          "-3.4028234663852886e+38", "3.4028235e38", "1.401298464324817e-45", "1e-46", "-1e-400", "1e-320",
          "9007199254740993", "9223372036854775807", "-9223372036854775808", "18446744073709551615",
          "123456789012345678901234567890", "2.2250738585072014e-308", "4.9e-324", "17", "-42", "1.0000001"]


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16"])
def test_real_looking_tokens_decode_to_the_same_bits(small_pieces, datatype):
    rng = np.random.default_rng(7)
    floats = rng.standard_normal(200).astype(np.float32)
    tokens = TOKENS * 3 + [json.dumps(float(v)) for v in floats] + [str(v) for v in floats[:50]]
    rng.shuffle(tokens)
    status, inputs = _decide_alike(_request(", ".join(tokens), len(tokens), datatype))
    assert status == "ok"
    expected = np.array([float(json.loads(t)) for t in tokens], np.float64)  # JSON -0 is the integer 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _bits(inputs["x"]) == _bits(expected.astype(v2.NUMPY_DTYPES[datatype]))


def test_a_real_size_body_reads_the_same_either_way():
    """The CNN body of the peers benchmark (3 MB), default thresholds."""
    image = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                   "data": image.ravel().tolist()}]}).encode()
    simd = outcome(bytearray(body))
    assert simd[0] == "ok" and _bits(simd[1]["input"]) == _bits(image)
    _same(simd, outcome(bytearray(body), simd_json=False))


@pytest.mark.parametrize("token", ["3.5e38", "-1e39", "1e308"])
def test_numbers_past_float32_become_infinity_as_before(small_pieces, token):
    status, inputs = _decide_alike(_request(", ".join(["1.5"] * 20 + [token] + ["2.5"] * 20), 41))
    assert status == "ok" and np.isinf(inputs["x"][20])


@pytest.mark.parametrize("token", ["1e400", "-1e309", "NaN", "Infinity", "-Infinity", "nan", "1.2.3", "1e", "--1",
                                   ".5", "0x10", "+1", "01", "1.", "1 2", "1,,2", "1,", "-", "\x00", "\xef\xbb\xbf1"])
def test_malformed_and_non_finite_tokens_are_named_as_before(small_pieces, token):
    simd = _decide_alike(_request(", ".join(["1.5"] * 20 + [token] + ["2.5"] * 20), 41, name="pixels"))
    assert simd[0] == "error" and "malformed JSON in request body" in simd[1]


@pytest.mark.parametrize("item", ["null", "true", "false", '"1.5"', "[1]", "{}", '{"a":1}'])
def test_other_values_in_the_list_decide_as_before(small_pieces, item):
    _decide_alike(_request(", ".join(["1.5"] * 20 + [item] + ["2.5"] * 20), 41))


@pytest.mark.parametrize("shape", [39, 41, 0, 1000])
def test_a_count_mismatch_is_named_as_before(small_pieces, shape):
    status, message = _decide_alike(_request(", ".join(str(i / 4) for i in range(40)), shape))
    assert status == "error"
    assert message == f"input x: shape [{shape}] needs {shape} elements, got 40"


@pytest.mark.parametrize("datatype", ["INT32", "INT64", "UINT8", "BOOL"])
def test_integer_tensors_keep_the_orjson_path(small_pieces, datatype):
    values = [0, 1, 2, 7, 100, 3, 1, 0] * 5
    assert _decide_alike(_request(", ".join(map(str, values)), 40, datatype))[0] == "ok"
    assert _decide_alike(_request(", ".join(["1.5"] * 40), 40, datatype))[0] == "ok"  # truncated, as before


def test_two_long_lists_share_the_parser_of_their_body(small_pieces):
    a, b = np.linspace(-1, 1, 30, dtype=np.float32), np.arange(25, dtype=np.float64) * -0.5
    body = json.dumps({"inputs": [{"name": "a", "shape": [30], "datatype": "FP32", "data": a.tolist()},
                                  {"name": "b", "shape": [5, 5], "datatype": "FP64", "data": b.tolist()}]}).encode()
    status, inputs = _decide_alike(body)
    assert status == "ok"
    assert _bits(inputs["a"]) == _bits(a) and _bits(inputs["b"]) == _bits(b.reshape(5, 5))


def test_the_parser_parses_again_after_a_refusal():
    numbers = SimdNumbers.create()
    assert numbers is not None
    for text, expected in [(b"[1, 2.5]", [1.0, 2.5]), (b'[1, "a"]', None), (b"[1e400]", None), (b"[1,]", None),
                           (b"{}", None), (b"1", None), (b"[-0.0, 3]", [-0.0, 3.0]), (b"[]", [])]:
        got = numbers.doubles(text)
        assert (got if got is None else got.tolist()) == expected, text


@settings(max_examples=300, deadline=None, database=None)
@given(tokens=st.lists(st.one_of(st.sampled_from(["true", "false", "null", "{}", "-0", "1e400"]),
                                 st.integers(-(2**64), 2**64).map(str), st.floats(width=32).map(json.dumps)),
                       min_size=1, max_size=60),
       datatype=st.sampled_from(["FP32", "FP64", "FP16", "INT32", "INT64", "UINT8", "BOOL"]),
       chunk=st.sampled_from([16, 64, 1 << 20]))
def test_fuzz_true_false_null_in_long_lists_decide_as_the_plain_parse(tokens, datatype, chunk):
    """They take the pieces (no memchr pass looks for them): numpy converts them one by one
    as it converts the whole list (NaN tokens of json.dumps are malformed JSON on every path)."""
    saved = v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES
    v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES = 8, chunk
    try:
        _decide_alike(_request(", ".join(tokens), len(tokens), datatype, "t"))
    finally:
        v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES = saved


finite = st.one_of(st.integers(-(2**64), 2**64), st.floats(width=32, allow_nan=False, allow_infinity=False),
                   st.floats(allow_nan=False, allow_infinity=False))
damage = st.sampled_from(["", "", "", "x", ".", "-", "e", "E", ",", "]", "[", '"', "t", "n", " ", "0", "1e9",
                          "e999", "\n", "}", "+", "Infinity", "NaN"])


@settings(max_examples=300, deadline=None, database=None)
@given(values=st.lists(finite, min_size=1, max_size=60), datatype=st.sampled_from(["FP32", "FP64", "FP16"]),
       at=st.integers(0, 10_000), cut=damage, separator=st.sampled_from([",", ", ", " ,\n"]),
       chunk=st.sampled_from([16, 64, 1 << 20]))
def test_fuzz_simdjson_decides_as_orjson_and_the_plain_parse(values, datatype, at, cut, separator, chunk):
    saved = v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES
    v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES = 8, chunk
    try:
        text = separator.join(json.dumps(v) for v in values)
        at %= len(text) + 1
        _decide_alike(_request(text[:at] + cut + text[at:], len(values), datatype, "t"))
    finally:
        v2.FAST_DATA_MIN_BYTES, v2.FAST_DATA_CHUNK_BYTES = saved
