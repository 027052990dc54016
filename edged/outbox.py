"""A durable outbox for MQTT messages that must not be lost.

SQLite in WAL mode under the state directory. Rows leave only when the broker
acknowledged them (PUBACK for QoS 1), so results produced while offline survive
a broker outage and a kill -9 of the daemon, and are delivered later in order.
Bounded by row count, total payload bytes and age; what the bounds drop is
counted (``dropped``, and the optional ``on_drop`` callback).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DROP_POLICIES = ("drop_oldest", "drop_newest")


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: str  # JSON of MQTT v5 properties (content type, user properties)
    created: float


class Outbox:
    def __init__(
        self, path: Path, max_rows: int = 100_000, max_age_s: float = 7 * 86400, policy: str = "drop_oldest",
        max_bytes: int = 0, on_drop: Callable[[int], None] | None = None,
    ) -> None:
        """``max_bytes`` bounds the summed payload sizes (0: no byte bound)."""
        if policy not in DROP_POLICIES:
            raise ValueError(f"outbox drop policy must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_age_s, self.policy, self.max_bytes = max_rows, max_age_s, policy, max_bytes
        self.on_drop = on_drop
        self.dropped = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: in WAL mode SQLite syncs the WAL at every commit, so a committed (acknowledged)
        # row survives power loss; NORMAL may roll the last commits back (sqlite.org/pragma.html).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, properties TEXT NOT NULL,"
            " created REAL NOT NULL)"
        )
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        self._rows, self._bytes = int(row[0]), int(row[1])

    def put(
        self, topic: str, payload: bytes | Callable[[int], bytes], qos: int = 1, retain: bool = False,
        properties: str = "{}",
    ) -> int | None:
        """Store a message; returns its id (its sequence number), or None when
        a bound refused it (drop_newest, or a message larger than max_bytes).

        ``payload`` may be a function of the id, for payloads that carry their
        own sequence number: it is called under the lock, so concurrent puts get
        distinct, increasing numbers in the same order as their rows."""
        with self._lock:
            self._expire()
            seq = self._next_id()
            data = payload(seq) if callable(payload) else payload
            size = len(data)
            if self.max_bytes and size > self.max_bytes:
                self._count_drop(1)
                return None
            if not self._fits(size):
                if self.policy == "drop_newest":
                    self._count_drop(1)
                    return None
                self._drop_oldest_for(size)
            self._db.execute(
                "INSERT INTO outbox (id, topic, payload, qos, retain, properties, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, topic, data, qos, int(retain), properties, time.time()),
            )
            self._rows += 1
            self._bytes += size
            return seq

    def next_id(self) -> int:
        """The id the next put will get (sequence numbers are never reused)."""
        with self._lock:
            return self._next_id()

    def peek(self, limit: int = 100, after: int = 0) -> list[OutboxMessage]:
        with self._lock:
            self._expire()
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, properties, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def ack(self, message_id: int) -> None:
        with self._lock:
            row = self._db.execute("SELECT LENGTH(payload) FROM outbox WHERE id = ?", (message_id,)).fetchone()
            if row is not None:  # already gone: a duplicate PUBACK, or dropped by a bound
                self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
                self._rows -= 1
                self._bytes -= int(row[0])

    def depth(self) -> int:
        with self._lock:
            return self._rows

    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def oldest_age(self) -> float:
        with self._lock:
            row = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        return max(0.0, time.time() - row[0]) if row else 0.0

    def durability(self) -> tuple[str, str]:
        """The journal mode and synchronous level in force, e.g. ("wal", "full")."""
        with self._lock:
            mode = str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            level = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return mode, {0: "off", 1: "normal", 2: "full", 3: "extra"}.get(level, str(level))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- under the lock ---------------------------------------------------
    def _next_id(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return (int(row[0]) if row else 0) + 1

    def _fits(self, size: int) -> bool:
        return self._rows + 1 <= self.max_rows and (not self.max_bytes or self._bytes + size <= self.max_bytes)

    def _drop_oldest_for(self, size: int) -> None:
        rows, total, last, dropped = self._rows, self._bytes, None, 0
        for row_id, length in self._db.execute("SELECT id, LENGTH(payload) FROM outbox ORDER BY id"):
            if rows + 1 <= self.max_rows and (not self.max_bytes or total + size <= self.max_bytes):
                break
            rows, total, last, dropped = rows - 1, total - int(length), row_id, dropped + 1
        if last is not None:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (last,))
        self._rows, self._bytes = rows, total
        self._count_drop(dropped)

    def _expire(self) -> None:
        cutoff = time.time() - self.max_age_s
        oldest = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        if oldest is None or oldest[0] >= cutoff:  # cheap check first: rows are in time order
            return
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE created < ?", (cutoff,)
        ).fetchone()
        if row[0]:
            self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,))
            self._rows -= int(row[0])
            self._bytes -= int(row[1])
            self._count_drop(int(row[0]))

    def _count_drop(self, n: int) -> None:
        if n <= 0:
            return
        self.dropped += n
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:  # a metrics callback must never fail a put
                pass
