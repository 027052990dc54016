"""LeanClient reads PUBLISH packets as paho does (same messages, same properties),
leaves what it does not recognise to paho, and sends a handler's reply at once.
A fake broker on a loopback socket speaks the wire protocol to a real client."""

from __future__ import annotations

import random
import socket
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from edged.transports.mqtt_client import PUBLISH_PROPERTIES, LeanClient, ReceivedProperties, decode_properties

NAMES = [name for name, _ in PUBLISH_PROPERTIES.values()]


def props_of(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def as_dict(props: Properties) -> dict[str, object]:
    return {name: getattr(props, name) for name in NAMES if hasattr(props, name)}


def paho_unpack(data: bytes) -> tuple[Properties, int]:
    return Properties(PacketTypes.PUBLISH).unpack(data)


CASES = [
    {},
    {"ResponseTopic": "bench/replies/1", "CorrelationData": b"\x00\x01\xff", "ContentType": "application/x-edged-tensor",
     "UserProperty": [("dtype", "FP32"), ("shape", "1,1,8,8")]},
    {"PayloadFormatIndicator": 1, "MessageExpiryInterval": 2**32 - 1, "TopicAlias": 7, "SubscriptionIdentifier": 300000,
     "UserProperty": [("größe", "✓ ok"), ("", ""), ("k", "v" * 300)]},
    {"CorrelationData": b"x" * 400, "ContentType": ""},
]


@pytest.mark.parametrize("values", CASES)
def test_properties_read_as_paho_reads_them(values):
    packed = bytes(props_of(**values).pack())
    mine, end = decode_properties(packed + b"payload", 0)
    theirs, length = paho_unpack(packed)
    assert isinstance(mine, ReceivedProperties) and isinstance(mine, Properties)
    assert end == length == len(packed)
    assert as_dict(mine) == as_dict(theirs)
    assert str(mine) == str(theirs)  # paho's own methods work on it (logs print properties)
    mine.UserProperty = ("added", "later")  # and its checked setter too
    assert mine.UserProperty[-1] == ("added", "later")


@pytest.mark.parametrize("packed", [
    b"\x03\x11\x00\x00",  # Session Expiry Interval: not a PUBLISH property
    b"\x05\x03\x00\x05ab",  # string longer than the properties
    b"\x04\x03\x00\x02\x00",  # string too short for its length
    b"\x05\x03\x00\x02a\x00",  # NUL in a string
    b"\x02\x01\x02",  # Payload Format Indicator 2
    b"\x03\x23\x00\x00",  # Topic Alias 0
    b"\x06\x03\x00\x01a\x03\x00",  # Content Type twice (cut short)
    b"\x08\x03\x00\x01a\x03\x00\x01b",  # Content Type twice
    b"\x09",  # length past the end
    b"\x03\x09\x00\x05",  # binary data past the end
    b"\x05\x03\x00\x02\xc3\x28",  # invalid UTF-8
    b"\x80\x80\x80\x80\x01",  # Variable Byte Integer over 4 bytes
])
def test_what_paho_refuses_is_left_to_paho(packed):
    with pytest.raises((ValueError, IndexError, KeyError, UnicodeDecodeError)):
        decode_properties(packed, 0)


def test_random_bytes_never_read_differently_from_paho():
    rng = random.Random(14)
    seeds = [bytes(props_of(**values).pack()) for values in CASES[1:]]
    accepted = 0
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            mine, end = decode_properties(bytes(data), 0)
        except (ValueError, IndexError, KeyError, UnicodeDecodeError):
            continue
        accepted += 1
        theirs, length = paho_unpack(bytes(data))  # raises if LeanClient accepted what paho refuses
        assert (end, as_dict(mine)) == (length, as_dict(theirs))
    assert accepted > 100


# -- a client against a fake broker --------------------------------------------
def publish_packet(topic: str, payload: bytes, qos: int = 0, mid: int = 0, props: Properties | None = None,
                   properties: bytes | None = None) -> bytes:
    packed = properties if properties is not None else (bytes(props.pack()) if props else b"\x00")
    body = len(topic.encode()).to_bytes(2, "big") + topic.encode() + (mid.to_bytes(2, "big") if qos else b"") + packed + payload
    return bytes([0x30 | qos << 1]) + bytes(VariableByteIntegers.encode(len(body))) + body


class FakeBroker:
    """Accepts one client, answers its CONNECT and hands over the socket."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._accept)
        self._thread.start()

    def _accept(self) -> None:
        self.conn, _ = self.server.accept()
        self.conn.settimeout(10)
        self.read_packet()  # CONNECT
        self.conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no properties

    def read_packet(self) -> bytes:
        assert self.conn is not None
        header = self.conn.recv(1)
        length = shift = 0
        while True:
            byte = self.conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        body = b""
        while len(body) < length:
            body += self.conn.recv(length - len(body))
        return header + body

    def close(self) -> None:
        self._thread.join(10)
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture()
def linked():
    broker = FakeBroker()
    client = LeanClient(mqtt.CallbackAPIVersion.VERSION2, client_id="lean", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    broker._thread.join(10)
    while not client.is_connected():
        client.loop(timeout=1.0)
    yield client, broker
    client.disconnect()
    broker.close()


def loop_until(client: mqtt.Client, done, rounds: int = 50) -> None:
    for _ in range(rounds):
        if done():
            return
        client.loop(timeout=0.2)
    assert done()


def test_qos1_request_is_handled_acknowledged_and_answered(linked):
    client, broker = linked
    got: list[mqtt.MQTTMessage] = []

    def on_message(c, userdata, message):
        got.append(message)
        c.publish(message.properties.ResponseTopic, b"answer:" + message.payload, qos=0)

    client.on_message = on_message
    props = props_of(ResponseTopic="replies/x", CorrelationData=b"\x07", UserProperty=[("a", "1"), ("b", "2")])
    broker.conn.sendall(publish_packet("edged/d/infer/m", b"\x01\x02", qos=1, mid=513, props=props))
    client.loop(timeout=5.0)  # one pass: reads the request, runs the handler, sends what it queued
    assert len(got) == 1
    message = got[0]
    assert (message.topic, message.payload, message.qos, message.mid, message.retain) == ("edged/d/infer/m", b"\x01\x02", 1, 513, False)
    assert message.properties.CorrelationData == b"\x07" and message.properties.UserProperty == [("a", "1"), ("b", "2")]
    broker.conn.settimeout(2)
    packets = {broker.read_packet() for _ in range(2)}  # paho queues the handler's reply before the PUBACK
    assert b"\x40\x02\x01" in packets  # PUBACK (header, then mid 513; read_packet drops the length)
    reply = (packets - {b"\x40\x02\x01"}).pop()
    assert reply[0] == 0x30 and reply.endswith(b"answer:\x01\x02") and b"replies/x" in reply


def test_filtered_callbacks_are_still_matched(linked):
    client, broker = linked
    plain: list[str] = []
    filtered: list[str] = []
    client.on_message = lambda c, u, m: plain.append(m.topic)
    client.message_callback_add("f/#", lambda c, u, m: filtered.append(m.topic))
    for topic in ("a/1", "f/x/y", "a/2"):
        broker.conn.sendall(publish_packet(topic, b"", props=props_of(ContentType="c")))
    loop_until(client, lambda: len(plain) + len(filtered) == 3)
    assert plain == ["a/1", "a/2"] and filtered == ["f/x/y"]


def test_a_packet_paho_refuses_closes_the_connection_as_paho_does(linked):
    client, broker = linked
    delivered: list[str] = []
    client.on_message = lambda c, u, m: delivered.append(m.topic)
    # Session Expiry Interval is no PUBLISH property: paho's parser refuses the packet.
    broker.conn.sendall(publish_packet("t/1", b"x", properties=b"\x05\x11\x00\x00\x00\x01"))
    loop_until(client, lambda: client._sock is None)
    assert delivered == []  # and the socket is closed (paho reconnects from its loop thread)


def test_handler_exception_is_paho_s_to_report(linked):
    client, broker = linked
    client.suppress_exceptions = True
    seen: list[str] = []

    def boom(c, u, m):
        seen.append(m.topic)
        raise RuntimeError("handler failed")

    client.on_message = boom
    broker.conn.sendall(publish_packet("t/boom", b"", props=props_of(ContentType="a")))
    broker.conn.sendall(publish_packet("t/after", b"", props=props_of(ContentType="b")))
    loop_until(client, lambda: len(seen) == 2)
    assert seen == ["t/boom", "t/after"] and client.is_connected()


def test_a_publish_from_another_thread_during_a_handler_goes_out(linked):
    """While a handler runs on the network thread paho's wake-up socket is set aside; a
    publish from another thread meanwhile neither fails nor waits for a later wake-up."""
    client, broker = linked
    errors: list[BaseException] = []

    def other_thread_publishes():
        try:
            client.publish("from/worker", b"w", qos=0)
        except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    def on_message(c, userdata, message):
        worker = threading.Thread(target=other_thread_publishes)
        worker.start()
        worker.join(10)
        c.publish("from/handler", b"h", qos=0)

    client.on_message = on_message
    broker.conn.sendall(publish_packet("t/x", b"", props=props_of(ContentType="c")))
    client.loop(timeout=5.0)
    broker.conn.settimeout(2)
    packets = [broker.read_packet() for _ in range(2)]
    topics = {packet[3:3 + int.from_bytes(packet[1:3], "big")] for packet in packets}  # header, length, topic
    assert errors == [] and topics == {b"from/worker", b"from/handler"}


def test_packets_read_together_or_split_are_all_delivered_whole(linked):
    """One read serves paho's pieces of many packets: packets that arrive together are all
    handled in one pass of the loop (the socket no longer shows them to select), one
    cut in the middle is finished by the next read, and one over the read size arrives whole."""
    client, broker = linked
    got: list[tuple[str, bytes]] = []
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    packets = [publish_packet(f"t/{i}", bytes([i]) * i, props=props_of(ContentType="c")) for i in range(1, 6)]
    broker.conn.sendall(b"".join(packets))
    client.loop(timeout=5.0)
    assert got == [(f"t/{i}", bytes([i]) * i) for i in range(1, 6)]
    got.clear()
    split = publish_packet("t/split", b"s" * 100, props=props_of(ContentType="c"))
    broker.conn.sendall(packets[0] + split[:30])
    client.loop(timeout=5.0)
    broker.conn.sendall(split[30:])
    loop_until(client, lambda: len(got) == 2)
    big = bytes(range(256)) * 1024  # 256 KiB, over READ_SIZE
    broker.conn.sendall(publish_packet("t/big", big, qos=1, mid=9, props=props_of(ContentType="c")))
    loop_until(client, lambda: len(got) == 3)
    assert got == [("t/1", b"\x01"), ("t/split", b"s" * 100), ("t/big", big)]


def test_publishes_read_whole_beside_other_packets_and_lengths_cut_short(linked):
    """A PUBLISH whole in the read buffer is handled by LeanClient; another packet
    (here a PINGRESP, and a QoS 2 PUBLISH) and a PUBLISH whose length is cut short go
    to paho's reader, in the order they came."""
    client, broker = linked
    got: list[str] = []
    client.on_message = lambda c, u, m: got.append(m.topic)
    long_one = publish_packet("t/long", b"L" * 300, props=props_of(ContentType="c"))  # a two-byte length
    qos2 = publish_packet("t/q2", b"2", qos=2, mid=5, props=props_of(ContentType="c"))
    broker.conn.sendall(publish_packet("t/a", b"a") + b"\xd0\x00" + qos2 + publish_packet("t/b", b"b") + long_one[:2])
    client.loop(timeout=5.0)
    broker.conn.settimeout(5)
    assert broker.read_packet()[:1] == b"\x50"  # paho's PUBREC for the QoS 2 message
    broker.conn.sendall(long_one[2:] + b"\x62\x02\x00\x05")  # the rest, then PUBREL for mid 5
    loop_until(client, lambda: len(got) == 4)
    assert got == ["t/a", "t/b", "t/long", "t/q2"] and client.is_connected()


def test_the_daemon_uses_the_lean_client_on_paho_2():
    from edged.transports.mqtt_client import client_class

    assert client_class() is LeanClient


@pytest.mark.parametrize("size", [0, 40, 200, 20000, 2_500_000])  # one-, two-, three- and four-byte lengths
def test_publish_qos0_writes_the_packet_paho_writes(linked, size):
    from edged.transports.mqtt_codec import finish_properties, pack_fields, reply_properties

    client, broker = linked
    fields = pack_fields("application/x-edged-tensor", [("dtype", "FP32"), ("shape", "1,10")])
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    info = client.publish_qos0("replies/a", payload, finish_properties(fields, b"\x01corr"))
    client.publish("replies/a", payload, qos=0, properties=reply_properties(fields, b"\x01corr"))
    broker.conn.settimeout(10)
    sent = []
    receiver = threading.Thread(target=lambda: sent.extend(broker.read_packet() for _ in range(2)))
    receiver.start()
    loop_until(client, lambda: not client.want_write())
    receiver.join(30)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS and len(sent) == 2 and sent[0] == sent[1]
    with pytest.raises(ValueError, match="wildcard"):
        client.publish_qos0("replies/+", b"", b"\x00")


def test_remaining_length_is_paho_s_variable_byte_integer():
    from edged.transports.mqtt_client import _remaining_length

    for size in (0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 268_435_455):
        assert _remaining_length(size) == bytes(VariableByteIntegers.encode(size))
    with pytest.raises(ValueError):
        _remaining_length(268_435_456)


@pytest.mark.parametrize("size", [40, 2_500_000])  # whole at once; over the socket's buffer: the rest queued
def test_a_handler_s_qos0_reply_goes_out_at_once_as_paho_writes_it(linked, size):
    from edged.transports.mqtt_codec import finish_properties, pack_fields, reply_properties

    client, broker = linked
    fields = pack_fields("application/x-edged-tensor; dtype=FP32", [])
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    infos = []

    def on_message(c, userdata, message):
        infos.append(c.publish_qos0("replies/a", payload, finish_properties(fields, b"\x01corr")))
        infos.append(c.want_write())  # small: nothing left in paho's queue

    client.on_message = on_message
    client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # 2.5 MB cannot go at once
    broker.conn.sendall(publish_packet("t/x", b"", props=props_of(ContentType="c")))
    loop_until(client, lambda: len(infos) == 2)
    assert infos[1] is (size > 40)
    broker.conn.settimeout(30)
    sent = []
    receiver = threading.Thread(target=lambda: sent.extend(broker.read_packet() for _ in range(2)))
    receiver.start()
    client.publish("replies/a", payload, qos=0, properties=reply_properties(fields, b"\x01corr"))
    loop_until(client, lambda: not client.want_write())
    receiver.join(30)
    assert infos[0].rc == mqtt.MQTT_ERR_SUCCESS and len(sent) == 2 and sent[0] == sent[1]
    loop_until(client, lambda: infos[0].is_published())


@pytest.mark.parametrize("report", [False, True])
def test_a_handler_s_qos0_reply_keeps_its_place_behind_queued_packets(linked, report):
    client, broker = linked
    published = []
    if report:
        client.on_publish = lambda c, u, mid, reason, props: published.append(mid)

    def on_message(c, userdata, message):
        c.publish("replies/first", b"1", qos=0)  # queued by paho (a callback holds its mutex)
        published.append(c.publish_qos0("replies/second", b"2", b"\x00").mid)

    client.on_message = on_message
    broker.conn.sendall(publish_packet("t/x", b"", props=props_of(ContentType="c")))
    client.loop(timeout=5.0)
    broker.conn.settimeout(5)
    packets = [broker.read_packet() for _ in range(2)]
    assert [p[3:3 + int.from_bytes(p[1:3], "big")] for p in packets] == [b"replies/first", b"replies/second"]
    if report:
        loop_until(client, lambda: len(published) == 3)  # on_publish reported both, as paho does


def test_a_partly_written_reply_goes_on_before_a_packet_another_thread_queued_meanwhile(linked):
    """A reply the socket takes only in part: its rest must go out before what another
    thread published while it was being written, or the two packets' bytes would mix."""
    from edged.transports.mqtt_codec import finish_properties, pack_fields

    client, broker = linked
    payload = bytes(range(256)) * 10_000  # 2.5 MB: more than the socket takes at once
    fields = pack_fields("application/x-edged-tensor; dtype=FP32", [])
    send = client._sock_send

    def send_while_another_thread_publishes(data):
        sent = send(data)  # the real socket write of the reply: it takes a part
        other = threading.Thread(target=lambda: client.publish("replies/other", b"3", qos=0))
        other.start()  # meanwhile another thread publishes
        other.join(10)
        return sent

    def on_message(c, userdata, message):
        client._sock_send = send_while_another_thread_publishes
        try:
            c.publish_qos0("replies/a", payload, finish_properties(fields, b"\x01corr"))
        finally:
            client._sock_send = send

    client.on_message = on_message
    client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    broker.conn.sendall(publish_packet("t/x", b"", props=props_of(ContentType="c")))
    broker.conn.settimeout(30)
    packets: list[bytes] = []
    receiver = threading.Thread(target=lambda: packets.extend(broker.read_packet() for _ in range(2)))
    receiver.start()
    loop_until(client, lambda: not receiver.is_alive() or (packets and not client.want_write()), rounds=200)
    receiver.join(30)
    topics = [p[3:3 + int.from_bytes(p[1:3], "big")] for p in packets]
    assert topics == [b"replies/a", b"replies/other"]
    assert packets[0].endswith(payload)
