"""Dynamic batching, configured as in Triton: concurrent requests to one model version
are merged along the batch dimension (dim 0) into one runtime call and split back.

There is no scheduler thread. The first request of a batch leads it: it waits until
the batch is full, reaches a preferred size, or ``max_queue_delay_us`` has passed since
it arrived, then takes a concurrency slot of the model (while it waits for the slot the
batch keeps filling), runs the batch and hands each member its rows. The other members
wait on an event. Requests join a forming batch only when their non-batch dimensions
and dtypes equal its own and the rows fit in ``max_batch_size``; a request larger than
``max_batch_size`` runs alone. Each request is validated before it joins, so a bad one
fails alone; a batch the runtime fails is run again request by request, so one request
that breaks the runtime fails alone too.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from edged.config import ModelSettings
from edged.errors import EdgedError, InferenceFailed, InvalidInput, Overloaded

if TYPE_CHECKING:
    from edged.model import LoadedModel
    from edged.registry import ModelEntry

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


@dataclass
class BatchMetrics:
    """The batch sizes formed, per model version, on the daemon's metrics registry."""

    rows: Histogram
    requests: Histogram

    @classmethod
    def register(cls, registry: CollectorRegistry) -> "BatchMetrics":
        return cls(
            rows=Histogram("edged_batch_size", "Rows (dim 0) of each batch sent to the runtime by the dynamic batcher.",
                           ["model", "version"], buckets=BATCH_BUCKETS, registry=registry),
            requests=Histogram("edged_batch_requests", "Requests merged into each batch by the dynamic batcher.",
                               ["model", "version"], buckets=BATCH_BUCKETS, registry=registry),
        )


@dataclass
class BatchedResult:
    """One request's share of a batch, with what the per-request metrics need."""

    outputs: dict[str, np.ndarray]
    queued_s: float  # from arrival until its batch started running (slot wait included)
    run_s: float  # the batch's runtime call
    batch_rows: int  # rows in the batch it ran in


@dataclass
class _Member:
    inputs: dict[str, np.ndarray]
    rows: int
    arrived: float
    wake: threading.Event = field(default_factory=threading.Event)
    batch: "_Batch | None" = None
    leads: bool = False
    result: BatchedResult | None = None
    error: EdgedError | None = None


@dataclass
class _Batch:
    key: tuple
    ready: threading.Condition  # notified when the batch may go before its deadline
    members: list[_Member] = field(default_factory=list)
    rows: int = 0
    cut: int = 0  # leading members whose rows sum to the largest preferred size reached

    def add(self, member: _Member, preferred: frozenset[int]) -> None:
        self.members.append(member)
        self.rows += member.rows
        member.batch = self
        if self.rows in preferred:
            self.cut = len(self.members)


def batch_key(inputs: dict[str, np.ndarray]) -> tuple:
    """What must be equal for requests to merge: names, dtypes, non-batch dimensions."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))


def batch_rows(inputs: dict[str, np.ndarray]) -> int:
    """The request's batch size (dim 0); InvalidInput when its inputs disagree."""
    sizes = {a.shape[0] for a in inputs.values()}
    if len(sizes) != 1:
        raise InvalidInput(f"inputs have different batch sizes (dim 0): {sorted(sizes)}")
    return sizes.pop()


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def split(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Each member's rows of every output (views); InferenceFailed when an output
    does not have the batch's rows in dim 0."""
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise InferenceFailed(f"output {name} has shape {list(array.shape)}, not the batch's {total} rows first")
    if len(rows) == 1:
        return [outputs]
    parts, start = [], 0
    for n in rows:
        parts.append({name: array[start:start + n] for name, array in outputs.items()})
        start += n
    return parts


class Batcher:
    """The dynamic batcher of one model version (``entry``)."""

    def __init__(self, entry: "ModelEntry", settings: ModelSettings, metrics: BatchMetrics | None = None) -> None:
        self.entry = entry
        self.max_rows = settings.max_batch_size
        self.delay_s = settings.max_queue_delay_us / 1e6
        self.preferred = frozenset(settings.preferred_batch_sizes)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._open: list[_Batch] = []
        self._waiting = 0  # requests in batches that have not started running

    def infer(self, inputs: dict[str, np.ndarray]) -> BatchedResult:
        """Run ``inputs`` in a batch with concurrent requests; raises EdgedError only."""
        model = self.entry.current_model()
        try:
            model.validate(inputs)  # a bad request fails here, alone
            rows = batch_rows(inputs)
        except InvalidInput:
            self.entry.count(ok=True)  # as the unbatched path counts it: not the model's fault
            raise
        member = _Member(inputs=inputs, rows=rows, arrived=time.perf_counter())
        if rows == 0 or rows > self.max_rows:
            return self._run_alone(member)
        key = batch_key(inputs)
        with self._lock:
            if self._waiting >= self.entry.max_queue:
                raise Overloaded(f"model {self.entry.name} version {self.entry.version} has "
                                 f"{self._waiting} requests waiting to be batched (max_queue)")
            self._waiting += 1
            batch = next((b for b in self._open if b.key == key and b.rows + rows <= self.max_rows), None)
            if batch is None:
                batch = _Batch(key=key, ready=threading.Condition(self._lock))
                self._open.append(batch)
                member.leads = True
            batch.add(member, self.preferred)
            if not member.leads and (batch.rows >= self.max_rows or batch.cut):
                batch.ready.notify()
        while not member.leads:
            member.wake.wait()
            member.wake.clear()
            if member.result is not None or member.error is not None:
                return self._outcome(member)
        self._lead(member)
        return self._outcome(member)

    @staticmethod
    def _outcome(member: _Member) -> BatchedResult:
        if member.error is not None:
            raise member.error
        if member.result is None:
            raise InferenceFailed("the batch ended without a result for this request")
        return member.result

    def _lead(self, leader: _Member) -> None:
        batch = leader.batch
        deadline = leader.arrived + self.delay_s
        with self._lock:
            while batch.rows < self.max_rows and not batch.cut:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                batch.ready.wait(left)
        try:
            model, _ = self.entry.acquire()  # the batch keeps filling while this waits
        except EdgedError as exc:  # not ready any more, or overloaded: nothing ran
            self._deliver_error(self._close(batch, deadline), exc, ran=False)
            return
        try:
            members = self._close(batch, deadline)
            self._run(model, members)
        finally:
            self.entry.release()

    def _close(self, batch: _Batch, deadline: float) -> list[_Member]:
        """Take ``batch`` out of the forming ones. Before its deadline, only its
        largest preferred size goes; the rest forms a new batch led by its first."""
        with self._lock:
            self._open.remove(batch)
            members = batch.members
            if 0 < batch.cut < len(members) and time.perf_counter() < deadline:
                members, rest = members[:batch.cut], members[batch.cut:]
                self._reopen(batch.key, rest)
            self._waiting -= len(members)
            return members

    def _reopen(self, key: tuple, rest: list[_Member]) -> None:
        batch = _Batch(key=key, ready=threading.Condition(self._lock))
        for member in rest:
            batch.add(member, self.preferred)
        self._open.append(batch)
        rest[0].leads = True
        rest[0].wake.set()

    def _run(self, model: "LoadedModel", members: list[_Member]) -> None:
        """Run ``members`` as one call; when that fails and there were several, each alone."""
        started = time.perf_counter()
        rows = [m.rows for m in members]
        try:
            outputs = split(model.infer(merge([m.inputs for m in members])), rows)
        except Exception as exc:
            if len(members) > 1:
                for member in members:
                    self._run(model, [member])
                return
            self._deliver_error(members, self._as_edged(exc), ran=True)
            return
        run_s = time.perf_counter() - started
        self._observe(sum(rows), len(members))
        for member, part in zip(members, outputs):
            self.entry.count(ok=True)
            member.result = BatchedResult(outputs=part, queued_s=started - member.arrived, run_s=run_s,
                                          batch_rows=sum(rows))
            member.wake.set()

    def _run_alone(self, member: _Member) -> BatchedResult:
        model, _ = self.entry.acquire()
        try:
            self._run(model, [member])
        finally:
            self.entry.release()
        return self._outcome(member)

    def _as_edged(self, exc: Exception) -> EdgedError:
        """The error a member gets: EdgedError as raised, a runtime's own exception
        logged and named without its text (as the data plane does)."""
        if isinstance(exc, EdgedError):
            return exc
        entry = self.entry
        log.warning("model %s %s failed in %s: %s: %s", entry.name, entry.version, entry.runtime,
                    type(exc).__name__, exc)
        return InferenceFailed(f"model {entry.name} failed in its runtime ({entry.runtime}); "
                               "the daemon's log has the details")

    def _deliver_error(self, members: list[_Member], exc: EdgedError, ran: bool) -> None:
        for member in members:
            if ran:  # counted as the unbatched path counts it: a bad request is not the model's fault
                self.entry.count(ok=not isinstance(exc, InferenceFailed))
            member.error = copy.copy(exc)  # each request thread raises its own instance
            member.wake.set()

    def _observe(self, rows: int, requests: int) -> None:
        if self.metrics is not None:
            self.metrics.rows.labels(self.entry.name, self.entry.version).observe(rows)
            self.metrics.requests.labels(self.entry.name, self.entry.version).observe(requests)
