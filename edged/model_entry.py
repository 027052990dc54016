"""One version of one model in the repository: its load state, the loaded
model, its concurrency slots and counters (``ModelEntry``). The registry
(``edged.registry``) keeps one per (name, version)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from edged.errors import ModelNotReady, Overloaded
from edged.model import LoadedModel

if TYPE_CHECKING:
    from edged.batching import Batcher


class ModelState(str, Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass
class ModelEntry:
    """One version of one model and everything needed to serve it."""

    name: str
    version: str
    source: Path
    runtime: str = ""
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    model: LoadedModel | None = None
    max_concurrency: int = 2
    max_queue: int = 64
    # Dynamic batcher when [models.<name>] max_batch_size >= 2; None: one request per runtime call.
    batcher: Batcher | None = field(default=None, init=False, repr=False)
    _running: int = field(default=0, init=False, repr=False)  # slots taken (at most max_concurrency)
    _pending: int = field(default=0, init=False, repr=False)  # running plus queued for a slot
    _slot_waiters: int = field(default=0, init=False, repr=False)
    _idle_waiters: int = field(default=0, init=False, repr=False)
    # Served requests and runtime failures of this load (OTA health watch).
    served: int = field(default=0, init=False)
    errors: int = field(default=0, init=False)
    # Moving average of the runtime's time per request (None until measured).
    typical_latency_s: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _idle: threading.Condition = field(init=False, repr=False)
    _free: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # One lock for the slots and the counts: a free slot is taken in one locked step,
        # and the conditions are only waited on (and notified) when someone waits.
        self._idle = threading.Condition(self._lock)
        self._free = threading.Condition(self._lock)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and self.model is not None

    @property
    def pending(self) -> int:
        return self._pending

    def current_model(self) -> LoadedModel:
        """The loaded model; ModelNotReady when there is none."""
        model = self.model
        if model is None or self.state is not ModelState.READY:
            raise ModelNotReady(f"model {self.name} version {self.version} is not ready: {self.reason or self.state.value}")
        return model

    def acquire(self) -> tuple[LoadedModel, float]:
        """Take a concurrency slot; returns the model and seconds spent queued
        (0.0 when a slot was free)."""
        with self._lock:
            if self._pending >= self.max_concurrency + self.max_queue:
                raise Overloaded(
                    f"model {self.name} version {self.version} is at its limit of "
                    f"{self.max_concurrency} running and {self.max_queue} queued requests"
                )
            self._pending += 1
            if self._running < self.max_concurrency:
                self._running += 1
                waited = 0.0
            else:
                start = time.perf_counter()
                self._slot_waiters += 1
                try:
                    while self._running >= self.max_concurrency:
                        self._free.wait()
                finally:
                    self._slot_waiters -= 1
                self._running += 1
                waited = time.perf_counter() - start
        model = self.model
        if model is None or self.state is not ModelState.READY:
            self.release()
            raise ModelNotReady(f"model {self.name} version {self.version} is not ready: {self.reason or self.state.value}")
        return model, waited

    def release(self, ok: bool | None = None, seconds: float | None = None) -> None:
        """Give the slot back; with ``ok``, count the request as :meth:`count` does, and
        with ``seconds``, note its run time (:meth:`note_latency`), in the same locked step."""
        with self._lock:
            self._running -= 1
            self._pending -= 1
            if self._slot_waiters:
                self._free.notify()
            if self._pending == 0 and self._idle_waiters:
                self._idle.notify_all()
            if ok is not None:
                self.served += 1
                if not ok:
                    self.errors += 1
            if seconds is not None:
                previous = self.typical_latency_s
                self.typical_latency_s = seconds if previous is None else 0.9 * previous + 0.1 * seconds

    def note_latency(self, seconds: float) -> None:
        previous = self.typical_latency_s
        self.typical_latency_s = seconds if previous is None else 0.9 * previous + 0.1 * seconds

    def count(self, ok: bool) -> None:
        with self._lock:
            self.served += 1
            if not ok:
                self.errors += 1

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            self._idle_waiters += 1
            try:
                return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout)
            finally:
                self._idle_waiters -= 1
