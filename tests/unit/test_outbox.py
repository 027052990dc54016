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


def test_byte_bound_drops_oldest_then_newest(tmp_path):
    drops = []
    box = Outbox(tmp_path / "e.sqlite", max_bytes=10, on_drop=drops.append)
    for i in range(4):
        box.put("t", bytes([i]) * 4)
    assert [m.payload[0] for m in box.peek()] == [2, 3] and box.size_bytes() == 8 and sum(drops) == 2
    assert box.put("t", b"x" * 11) is None and box.dropped == 3  # larger than the whole bound
    box = Outbox(tmp_path / "f.sqlite", max_bytes=10, policy="drop_newest")
    assert [box.put("t", b"abcd") is not None for _ in range(3)] == [True, True, False]
    box.ack(box.peek()[0].id)
    assert box.depth() == 1 and box.size_bytes() == 4
    box.close()
    assert Outbox(tmp_path / "f.sqlite", max_bytes=10).size_bytes() == 4  # counters rebuilt on open


def test_concurrent_puts_get_distinct_increasing_sequence_numbers(tmp_path):
    import json
    import threading

    box = Outbox(tmp_path / "g.sqlite")

    def worker():
        for _ in range(50):
            box.put("t", lambda seq: json.dumps({"seq": seq}).encode())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = box.peek(limit=1000)
    assert [json.loads(m.payload)["seq"] for m in rows] == [m.id for m in rows] == list(range(1, 201))


def test_commits_are_durable_on_power_loss(tmp_path):
    """WAL with synchronous=NORMAL may roll back the last commits on power loss
    (sqlite.org/pragma.html#pragma_synchronous); an acknowledged row must not be."""
    box = Outbox(tmp_path / "p.sqlite")
    try:
        assert box.durability() == ("wal", "full")
    finally:
        box.close()
    box = Outbox(tmp_path / "p.sqlite")  # and again on reopening an existing file
    try:
        assert box.durability() == ("wal", "full")
    finally:
        box.close()
