"""Reply properties packed by hand read back the same through paho's own parser."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import numpy as np

from edged.transports.mqtt_codec import PackedProperties, RawReplyFields, pack_fields, pack_properties, reply_properties


def unpack(packed: bytes) -> Properties:
    props, length = Properties(PacketTypes.PUBLISH).unpack(packed)
    assert length == len(packed)
    return props


def test_packed_properties_read_back_through_paho():
    user = [("output", "logits"), ("dtype", "FP32"), ("shape", "1,10"), ("model_version", "1.0.0")]
    props = unpack(pack_properties("application/x-edged-tensor", user, b"\x00corr\xff"))
    assert props.ContentType == "application/x-edged-tensor"
    assert props.UserProperty == user
    assert props.CorrelationData == b"\x00corr\xff"


def test_no_correlation_no_user_properties_and_unicode():
    props = unpack(pack_properties("application/json", [("ausgabe", "größe ✓")], None))
    assert props.ContentType == "application/json"
    assert props.UserProperty == [("ausgabe", "größe ✓")]
    assert not hasattr(props, "CorrelationData")
    assert unpack(pack_properties("application/json", [], None)).ContentType == "application/json"


def test_long_properties_use_a_multi_byte_length():
    user = [(f"k{i}", "v" * 200) for i in range(3)]  # over 127 bytes: a two-byte variable length
    props = unpack(pack_properties("application/json", user, b"x" * 300))
    assert props.UserProperty == user and props.CorrelationData == b"x" * 300


def test_a_value_over_the_mqtt_limit_is_refused():
    with pytest.raises(ValueError, match="over the limit of 65535"):
        pack_properties("application/json", [("big", "v" * 70000)], None)


def test_reply_properties_are_paho_properties_that_pack_to_the_same_bytes():
    props = reply_properties(pack_fields("application/json", [("error_code", "internal")]), b"c")
    assert isinstance(props, PackedProperties) and isinstance(props, Properties)
    assert props.pack() == pack_properties("application/json", [("error_code", "internal")], b"c")
    assert "bytes of packed properties" in str(props)


def test_raw_reply_fields_describe_the_output_and_stay_bounded():
    fields = RawReplyFields(limit=2)
    packed = fields.get("logits", np.dtype("float32"), (1, 10), "1.0.0")
    props = unpack(reply_properties(packed, b"id").pack())
    assert props.ContentType == "application/x-edged-tensor" and props.CorrelationData == b"id"
    assert props.UserProperty == [("output", "logits"), ("dtype", "FP32"), ("shape", "1,10"), ("model_version", "1.0.0")]
    assert fields.get("logits", np.dtype("float32"), (1, 10), "1.0.0") is packed  # kept
    other = unpack(reply_properties(fields.get("y", np.dtype("int8"), (4, 3), "2"), None).pack())
    assert dict(other.UserProperty) == {"output": "y", "dtype": "INT8", "shape": "4,3", "model_version": "2"}
    fields.get("z", np.dtype("uint8"), (), "2")  # over the limit: starts afresh
    assert len(fields._packed) == 1
    assert dict(unpack(reply_properties(fields.get("z", np.dtype("uint8"), (), "2"), None).pack()).UserProperty)["shape"] == ""


def test_raw_spec_is_remembered_and_bad_specs_refused_every_time():
    from edged.errors import InvalidInput
    from edged.transports.mqtt_codec import raw_spec

    assert raw_spec("FP32", "1,1,8,8") == (np.dtype("float32"), (1, 1, 8, 8), 256)
    assert raw_spec("FP32", "1,1,8,8") is raw_spec("FP32", "1,1,8,8")
    for _ in range(2):
        with pytest.raises(InvalidInput, match="negative dimension"):
            raw_spec("FP32", "1,-1")


def test_content_type_parameters_parse_tokens_quoted_and_unquoted_commas():
    from edged.transports.mqtt_codec import content_type_parameters

    assert content_type_parameters('application/x-edged-tensor; dtype=FP32; shape="1,1,8,8"') == (
        "application/x-edged-tensor", (("dtype", "FP32"), ("shape", "1,1,8,8")))
    assert content_type_parameters("Application/X-Edged-Tensor;DType=FP32;shape=1,1,8,8;") == (
        "application/x-edged-tensor", (("dtype", "FP32"), ("shape", "1,1,8,8")))
    assert content_type_parameters('application/x-edged-tensor; input="a \\"b\\"; c"')[1] == (("input", 'a "b"; c'),)


@pytest.mark.parametrize("text", ["application/x-edged-tensor; dtype", "application/x-edged-tensor; dtype=FP 32",
                                  'application/x-edged-tensor; input="open', "application/x-edged-tensor; =FP32"])
def test_malformed_content_type_parameters_are_refused_with_a_clear_error(text):
    from edged.errors import InvalidInput
    from edged.transports.mqtt_codec import content_type_parameters

    with pytest.raises(InvalidInput, match="parameters must read"):
        content_type_parameters(text)


def test_raw_parameters_only_for_the_raw_tensor_type_with_parameters():
    from edged.transports.mqtt_codec import raw_parameters

    assert raw_parameters("application/x-edged-tensor") is None  # user properties describe it
    assert raw_parameters("application/json; charset=utf-8") is None
    assert raw_parameters("application/x-edged-tensorial; dtype=FP32") is None
    assert raw_parameters('application/x-edged-tensor; dtype=INT8; shape="2,3"; charset=x; version=4') == {
        "dtype": "INT8", "shape": "2,3", "version": "4"}


def test_raw_reply_fields_in_content_type_parameters_read_back_with_paho_and_email():
    from email.message import Message

    from edged.transports.mqtt_codec import content_type_parameters

    fields = RawReplyFields()
    packed = fields.get('out "1"; x', np.dtype("float32"), (1, 10), "1.0.0", in_content_type=True)
    props = unpack(reply_properties(packed, b"id").pack())
    assert not hasattr(props, "UserProperty") and props.CorrelationData == b"id"
    assert props.ContentType == 'application/x-edged-tensor; output="out \\"1\\"; x"; dtype=FP32; shape="1,10"; model_version=1.0.0'
    expected = {"output": 'out "1"; x', "dtype": "FP32", "shape": "1,10", "model_version": "1.0.0"}
    assert dict(content_type_parameters(props.ContentType)[1]) == expected
    header = Message()
    header["content-type"] = props.ContentType
    assert header.get_content_type() == "application/x-edged-tensor"
    assert {key: header.get_param(key) for key in expected} == expected
    # the user-property form of the same output stays as it was, kept apart
    assert fields.get('out "1"; x', np.dtype("float32"), (1, 10), "1.0.0") != packed
