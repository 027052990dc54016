import time

import pytest

from edged.outbox import Outbox


def test_order_ack_and_durability(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put("t", f"m{i}".encode()) for i in range(5)]
    assert ids == sorted(ids)
    box.ack(ids[0])
    box.close()
    box = Outbox(tmp_path / "o.sqlite")  # survives a restart
    assert [m.payload for m in box.peek()] == [b"m1", b"m2", b"m3", b"m4"]
    assert box.next_id() == ids[-1] + 1  # sequence numbers are never reused


def test_drop_oldest_and_newest(tmp_path):
    box = Outbox(tmp_path / "a.sqlite", max_rows=3)
    for i in range(5):
        box.put("t", bytes([i]))
    assert [m.payload for m in box.peek()] == [b"\x02", b"\x03", b"\x04"] and box.dropped == 2
    box = Outbox(tmp_path / "b.sqlite", max_rows=3, policy="drop_newest")
    results = [box.put("t", bytes([i])) for i in range(5)]
    assert results[3:] == [None, None] and box.dropped == 2
    assert [m.payload for m in box.peek()] == [b"\x00", b"\x01", b"\x02"]


def test_age_bound(tmp_path):
    box = Outbox(tmp_path / "c.sqlite", max_age_s=0.05)
    box.put("t", b"old")
    time.sleep(0.1)
    assert box.peek() == [] and box.dropped == 1
    assert box.oldest_age() == 0.0


def test_bad_policy(tmp_path):
    with pytest.raises(ValueError, match="drop_oldest"):
        Outbox(tmp_path / "d.sqlite", policy="drop_random")
