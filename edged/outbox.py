"""A durable outbox for MQTT messages that must not be lost.

SQLite in WAL mode under the state directory. Rows leave only when the broker
acknowledged them (PUBACK for QoS 1), so results produced while offline survive
a broker outage and a kill -9 of the daemon, and are delivered later in order.
Bounded by row count and age; what the bound drops is counted.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
    def __init__(self, path: Path, max_rows: int = 100_000, max_age_s: float = 7 * 86400, policy: str = "drop_oldest") -> None:
        if policy not in DROP_POLICIES:
            raise ValueError(f"outbox drop policy must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_age_s, self.policy = max_rows, max_age_s, policy
        self.dropped = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, properties TEXT NOT NULL,"
            " created REAL NOT NULL)"
        )

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: str = "{}") -> int | None:
        """Store a message; returns its id (its sequence number), or None when
        the drop_newest policy refused it."""
        with self._lock:
            self._expire()
            count = self._count()
            if count >= self.max_rows:
                if self.policy == "drop_newest":
                    self.dropped += 1
                    return None
                excess = count - self.max_rows + 1
                self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,))
                self.dropped += excess
            cur = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, properties, created) VALUES (?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), properties, time.time()),
            )
            return int(cur.lastrowid)

    def next_id(self) -> int:
        """The id the next put will get (sequence numbers are never reused)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            return (int(row[0]) if row else 0) + 1

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
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def depth(self) -> int:
        with self._lock:
            return self._count()

    def oldest_age(self) -> float:
        with self._lock:
            row = self._db.execute("SELECT MIN(created) FROM outbox").fetchone()
        return max(0.0, time.time() - row[0]) if row and row[0] is not None else 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def _expire(self) -> None:
        cur = self._db.execute("DELETE FROM outbox WHERE created < ?", (time.time() - self.max_age_s,))
        self.dropped += max(0, cur.rowcount)
