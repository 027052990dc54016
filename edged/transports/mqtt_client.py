"""The daemon's paho client, leaner where every request pays (``LeanClient``).

- PUBLISH properties: paho's ``Properties.unpack`` scans its name table with
  string replaces in each ``setattr``, about 90 µs for a request's Response
  Topic, Correlation Data, Content Type and two User Properties. MQTT v5 QoS 0
  and 1 PUBLISH packets are parsed here (~7 µs) into the same paho objects (an
  ``MQTTMessage`` whose ``properties`` is a paho ``Properties``).
- ``on_message`` is called without paho's topic matcher while no per-filter
  callback exists: the matcher's recursive closure was a reference cycle per
  message, left to the garbage collector (a collection every ~120 requests).
- One socket read per pass of the loop: each MQTT v5 QoS 0 or 1 PUBLISH whole
  in it is handled here, without paho's packet reader; paho's pieces of any
  other packet (type, each length byte, the rest) are served from that read
  instead of a system call each.
- What a handler publishes on the network thread (its reply) and the PUBACK
  are written in the same pass of paho's loop, without a wake-up byte through
  paho's socket pair and a second pass to read it; a QoS 0 reply with nothing
  queued before it is written to the socket at once (``publish_qos0``), without
  paho's packet queue.

Anything else (QoS 2, MQTT 3, a property a PUBLISH may not carry, a malformed
packet) goes to paho's own parser, so paho's errors and behaviour stay. The
overrides use paho 2's internals; ``client_class`` falls back to paho's own
client on another major version.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# paho's property tables, built once and shared read-only by every ReceivedProperties.
_TABLES = Properties(PacketTypes.PUBLISH)

BYTE, TWO_BYTES, FOUR_BYTES, VARINT, BINARY, UTF8, UTF8_PAIR = range(7)  # paho's type indexes
# The properties a PUBLISH may carry (MQTT 5.0, 3.3.2.3): identifier -> (attribute name, type).
PUBLISH_PROPERTIES: dict[int, tuple[str, int]] = {
    ident: (name.replace(" ", ""), _TABLES.properties[ident][0])
    for name, ident in _TABLES.names.items()
    if PacketTypes.PUBLISH in _TABLES.properties[ident][1]
}
READ_SIZE = 65536  # bytes asked of the socket at once
PUBLISH_QOS0 = bytes([mqtt.PUBLISH])  # fixed header's first byte: PUBLISH, QoS 0, no DUP, no RETAIN
MULTIPLE = {11, 38}  # Subscription Identifier and User Property may repeat
# Values paho refuses when it sets them: Payload Format Indicator, Subscription Identifier, Topic Alias.
RANGES = {1: (0, 1), 11: (1, 268_435_455), 35: (1, 65535)}


class ReceivedProperties(Properties):
    """A paho ``Properties`` for a received PUBLISH, filled without paho's checks
    (the parser made them); its tables are shared instead of built per object."""

    def __init__(self) -> None:  # noqa: super().__init__ left out on purpose
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "types", _TABLES.types)
        object.__setattr__(self, "names", _TABLES.names)
        object.__setattr__(self, "properties", _TABLES.properties)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A Variable Byte Integer at ``pos``: (value, position after it); IndexError past the end."""
    value = shift = 0
    for _ in range(4):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("variable byte integer over 4 bytes")


def _remaining_length(size: int) -> bytes:
    """A packet's Remaining Length as a Variable Byte Integer."""
    if size > 268_435_455:
        raise ValueError("packet too large for MQTT")
    out = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | 0x80 if size else byte)
        if not size:
            return bytes(out)


def _string(data: bytes, pos: int, end: int) -> tuple[str, int]:
    size = int.from_bytes(data[pos:pos + 2], "big")
    stop = pos + 2 + size
    if pos + 2 > end or stop > end:
        raise ValueError("string past the end of the properties")
    text = data[pos + 2:stop].decode("utf-8")
    if "\x00" in text or "\ufeff" in text:  # MQTT-1.5.4-2 and -3 (Python's UTF-8 decoder refuses surrogates)
        raise ValueError("a character MQTT forbids in a string")
    return text, stop


def decode_properties(data: bytes, pos: int) -> tuple[ReceivedProperties, int]:
    """PUBLISH properties at ``pos`` (their length first): the properties and the
    position after them. ValueError or IndexError for anything paho should judge."""
    length, pos = _varint(data, pos)
    end = pos + length
    if end > len(data):
        raise ValueError("properties past the end of the packet")
    props = ReceivedProperties()
    values = props.__dict__
    while pos < end:
        ident = data[pos]  # every identifier is under 128: a one-byte Variable Byte Integer
        pos += 1
        name, kind = PUBLISH_PROPERTIES[ident]  # KeyError: not a PUBLISH property
        value: Any
        if kind == UTF8:
            value, pos = _string(data, pos, end)
        elif kind == BINARY:
            size = int.from_bytes(data[pos:pos + 2], "big")
            if pos + 2 + size > end:
                raise ValueError("binary data past the end of the properties")
            value, pos = data[pos + 2:pos + 2 + size], pos + 2 + size
        elif kind == UTF8_PAIR:
            key, pos = _string(data, pos, end)
            text, pos = _string(data, pos, end)
            value = (key, text)
        elif kind == BYTE:
            value, pos = data[pos], pos + 1
        elif kind == TWO_BYTES:
            value, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif kind == FOUR_BYTES:
            value, pos = int.from_bytes(data[pos:pos + 4], "big"), pos + 4
        else:
            value, pos = _varint(data, pos)
        if pos > end:
            raise ValueError("a property past the end of the properties")
        if ident in RANGES and not RANGES[ident][0] <= value <= RANGES[ident][1]:
            raise ValueError(f"property {name} out of its range")
        if ident in MULTIPLE:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise ValueError(f"property {name} more than once")
        else:
            values[name] = value
    return props, end


class _NoWakeUp:
    """Stands in for paho's wake-up socket while a message handler runs on the network
    thread: never None, so a thread that checked paho's socket before cannot find None."""

    def send(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        """Nothing to close."""


_NO_WAKE: Any = _NoWakeUp()


class LeanClient(mqtt.Client):
    """paho's client with the lean read and reply path of this module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._filtered_callbacks = False  # whether message_callback_add was ever called
        self._read_buffer = b""  # bytes read from _read_sock that paho has not asked for yet
        self._read_pos = 0
        self._read_sock: Any = None
        self._handler_thread: int | None = None  # the network thread while it runs on_message

    # -- reads: one recv for paho's pieces ---------------------------------------
    def _sock_recv(self, bufsize: int) -> bytes:
        """paho reads a packet in pieces (its type, each byte of its length, then the
        rest), a system call each: they are served from one read of up to READ_SIZE."""
        if self._read_sock is not self._sock:  # a new connection: nothing of the old one
            self._read_buffer, self._read_pos, self._read_sock = b"", 0, self._sock
        pos = self._read_pos
        if pos >= len(self._read_buffer):
            data = super()._sock_recv(max(bufsize, READ_SIZE))
            if len(data) <= bufsize:
                return data
            self._read_buffer, self._read_pos = data, bufsize
            return data[:bufsize]
        self._read_pos = pos + bufsize
        return self._read_buffer[pos:pos + bufsize]  # maybe short: paho reads on

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """One socket read; each whole MQTT v5 PUBLISH at QoS 0 or 1 in it is handled
        here, the rest (another packet, a partial one) by paho's loop_read, repeated
        while read bytes wait in the buffer: the socket no longer shows them to select()."""
        sock = self._sock
        if sock is None or self._in_packet["command"] != 0 or self._protocol != mqtt.MQTTv5:
            return self._paho_loop_read(max_packets)
        if self._read_sock is not sock:  # a new connection: nothing of the old one
            self._read_buffer, self._read_pos, self._read_sock = b"", 0, sock
        if self._read_pos >= len(self._read_buffer):
            try:
                data = super()._sock_recv(READ_SIZE)
            except BlockingIOError:
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            except OSError as err:  # as paho's _packet_read reports it
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return self._loop_rc_handle(mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST)
            if not data:
                return self._loop_rc_handle(mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST)
            self._read_buffer, self._read_pos = data, 0
        while self._sock is sock and self._read_pos < len(self._read_buffer):
            rc = self._whole_publish()
            if rc is None:  # not a whole QoS 0 or 1 PUBLISH: paho reads it
                return self._paho_loop_read(max_packets)
            if rc:
                return self._loop_rc_handle(rc)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _whole_publish(self) -> mqtt.MQTTErrorCode | None:
        """Handle the PUBLISH at the read position as paho's _packet_read would, if it is
        whole in the buffer and at QoS 0 or 1; None (nothing consumed) otherwise."""
        data, pos = self._read_buffer, self._read_pos
        header = data[pos]
        if header & 0xF0 != mqtt.PUBLISH or header & 0x06 > 0x02:
            return None
        try:
            length, start = _varint(data, pos + 1)
        except (IndexError, ValueError):  # cut short, or paho's protocol error to report
            return None
        end = start + length
        if end > len(data):
            return None
        self._read_pos = end
        self._in_packet["command"] = header
        self._in_packet["packet"] = data[start:end]
        try:
            rc = self._handle_publish()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                           "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _paho_loop_read(self, max_packets: int) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while (rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None
               and self._read_sock is self._sock and self._read_pos < len(self._read_buffer)):
            rc = super().loop_read(max_packets)
        return rc

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """``on_message`` as paho calls it, without paho's topic matcher while no
        per-filter callback was added: each match built a recursive closure, a
        reference cycle (6 objects a message) that only the garbage collector
        frees, so its collections (milliseconds each) came every hundred messages."""
        if self._filtered_callbacks:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol != mqtt.MQTTv5 or qos > 1:
            return super()._handle_publish()
        data = self._in_packet["packet"]
        if not isinstance(data, bytes):
            data = bytes(data)
        try:
            size = int.from_bytes(data[0:2], "big")
            topic = data[2:2 + size]
            pos = 2 + size
            mid = 0
            if qos:
                mid = int.from_bytes(data[pos:pos + 2], "big")
                pos += 2
            if pos > len(data):
                raise ValueError("PUBLISH header past the end of the packet")
            props, pos = decode_properties(data, pos)
        except (ValueError, IndexError, KeyError, UnicodeDecodeError):
            return super()._handle_publish()  # paho's parser judges it, with paho's errors
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = props
        message.payload = data[pos:]
        message.timestamp = time.monotonic()
        # What the handler publishes on this thread (its reply), and the PUBACK, need no
        # wake-up byte through paho's socket pair (nor an extra pass of its loop to read
        # it): _send_queued writes them. Another thread that queues meanwhile skips its
        # byte too (it appended its packet first), and its packet goes out with them.
        wake, self._sockpairW = self._sockpairW, _NO_WAKE
        rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        self._handler_thread = threading.get_ident()
        try:
            self._handle_on_message(message)
            if qos == 1 and not self._manual_ack:
                rc = self._send_puback(mid)
        finally:
            self._handler_thread = None
            if self._sockpairW is _NO_WAKE:  # else paho replaced its sockets meanwhile
                self._sockpairW = wake
        self._send_queued()
        return rc

    # -- replies -------------------------------------------------------------
    def publish_qos0(self, topic: str, payload: bytes, properties: bytes) -> mqtt.MQTTMessageInfo:
        """A QoS 0 PUBLISH whose properties are already in wire form (their length
        first): the same packet paho's publish() writes, without its conversions and
        checks for every kind of payload and properties. From a message handler on
        the network thread, with nothing queued before it and no ``on_publish``, it
        goes to the socket at once (what does not fit is queued, as paho queues it);
        else it is queued as paho's publish() queues it."""
        topic_bytes = topic.encode()
        if b"+" in topic_bytes or b"#" in topic_bytes or len(topic_bytes) > 65535:
            raise ValueError(f"cannot publish to topic {topic!r} (a wildcard, or over 65535 bytes)")
        mid = self._mid_generate()
        info = mqtt.MQTTMessageInfo(mid)
        if self._sock is None:
            info.rc = mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            return info
        size = 2 + len(topic_bytes) + len(properties) + len(payload)
        packet = b"".join((PUBLISH_QOS0, _remaining_length(size), len(topic_bytes).to_bytes(2, "big"), topic_bytes,
                           properties, payload))
        if self._handler_thread == threading.get_ident() and not self._out_packet and self.on_publish is None:
            self._write_now(packet, mid, info)
        else:
            info.rc = self._packet_queue(mqtt.PUBLISH, packet, mid, 0, info)
        return info

    def _write_now(self, packet: bytes, mid: int, info: mqtt.MQTTMessageInfo) -> None:
        """Write a QoS 0 PUBLISH on the network thread, as paho's _packet_write would
        write it first in its queue; the rest of a partial write, and a packet the
        socket refused (paho's loop then handles the error), go to paho's queue."""
        try:
            sent = self._sock_send(packet)
        except BlockingIOError:
            sent = 0
        except (OSError, AttributeError, ValueError):
            self._packet_queue(mqtt.PUBLISH, packet, mid, 0, info)
            return
        if sent < len(packet):
            # Its rest goes first: the queue was empty when this began, so all that is in it
            # now came from other threads meanwhile, and the rest must not go after them.
            self._out_packet.appendleft({"command": mqtt.PUBLISH, "mid": mid, "qos": 0, "pos": sent,
                                         "to_process": len(packet) - sent, "packet": packet, "info": info})
            return
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()
        info._set_as_published()

    def _send_queued(self) -> None:
        """Write what the handler queued (its reply) now, on this network thread, rather
        than after paho's loop wakes up for it; a write error is handled as paho's loop
        handles it (the connection is closed and reopened)."""
        if self._out_packet and self._sock is not None:
            self.loop_write()


def client_class() -> type[mqtt.Client]:
    """LeanClient on the paho 2 it was written and tested against, else paho's own client."""
    internals = ("_handle_publish", "_handle_on_message", "_sock_recv", "_send_puback", "_packet_queue",
                 "_mid_generate", "_sock_send")
    if paho.mqtt.__version__.startswith("2.") and all(hasattr(mqtt.Client, name) for name in internals):
        return LeanClient
    return mqtt.Client
