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
    _slots: threading.Semaphore = field(init=False, repr=False)
    _pending: int = field(default=0, init=False, repr=False)
    # Served requests and runtime failures of this load (OTA health watch).
    served: int = field(default=0, init=False)
    errors: int = field(default=0, init=False)
    # Moving average of the runtime's time per request (None until measured).
    typical_latency_s: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _idle: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = threading.Semaphore(self.max_concurrency)
        self._idle = threading.Condition(self._lock)

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
        """Take a concurrency slot; returns the model and seconds spent queued."""
        with self._lock:
            if self._pending >= self.max_concurrency + self.max_queue:
                raise Overloaded(
                    f"model {self.name} version {self.version} is at its limit of "
                    f"{self.max_concurrency} running and {self.max_queue} queued requests"
                )
            self._pending += 1
        start = time.perf_counter()
        self._slots.acquire()
        waited = time.perf_counter() - start
        model = self.model
        if model is None or self.state is not ModelState.READY:
            self.release()
            raise ModelNotReady(f"model {self.name} version {self.version} is not ready: {self.reason or self.state.value}")
        return model, waited

    def release(self) -> None:
        self._slots.release()
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

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
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout)
