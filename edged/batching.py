"""Dynamic batching, configured as in Triton: concurrent requests to one model version
are merged along the batch dimension (dim 0) into one runtime call and split back.

A request that finds no forming batch it fits in starts one and hands it to one of
the batcher's ``max_concurrency`` worker threads. That worker waits until the batch is
full, reaches a preferred size, or ``max_queue_delay_us`` has passed since its first
request arrived, then takes a concurrency slot of the model, runs the batch and sets
each request's future to its rows. While the workers are busy, new batches keep
filling in the queue, so batches grow with the load even at a delay of 0.

Requests join a forming batch only when their non-batch dimensions and dtypes equal
its own and the rows fit in ``max_batch_size``; a request larger than
``max_batch_size`` runs alone. Each request is validated before it joins, so a bad one
fails alone; a batch the runtime fails is run again request by request, so one request
that breaks the runtime fails alone too.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from edged.config import ModelSettings
from edged.errors import EdgedError, InferenceFailed, InvalidInput, ModelNotReady, Overloaded

if TYPE_CHECKING:
    from edged.model import LoadedModel
    from edged.model_entry import ModelEntry

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
    future: Future = field(default_factory=Future)


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
    """The dynamic batcher of one model version (``entry``). Batches run on its own
    ``max_concurrency`` worker threads, which also wait out the queue delay."""

    def __init__(self, entry: "ModelEntry", settings: ModelSettings, metrics: BatchMetrics | None = None) -> None:
        self.entry = entry
        self.max_rows = settings.max_batch_size
        self.delay_s = settings.max_queue_delay_us / 1e6
        self.preferred = frozenset(settings.preferred_batch_sizes)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._open: list[_Batch] = []
        self._waiting = 0  # requests in batches that have not started running
        self._closed = False  # replaced by a reload or unloaded: new requests go elsewhere
        # Its threads end when the batcher is dropped (ThreadPoolExecutor's weak reference).
        self._workers = ThreadPoolExecutor(max_workers=entry.max_concurrency,
                                           thread_name_prefix=f"edged-batch-{entry.name}")

    def infer(self, inputs: dict[str, np.ndarray]) -> BatchedResult:
        """Run ``inputs`` in a batch with concurrent requests; raises EdgedError only."""
        return self.submit(inputs).result()

    def submit(self, inputs: dict[str, np.ndarray]) -> Future:
        """Validate ``inputs`` (InvalidInput now, for this request alone) and queue them;
        the future gets a BatchedResult or an EdgedError. Never blocks: an event loop
        may call it (``asyncio.wrap_future``) and await one thread hop per batch."""
        model = self.entry.current_model()
        try:
            model.validate(inputs)
            rows = batch_rows(inputs)
        except InvalidInput:
            self.entry.count(ok=True)  # as the unbatched path counts it: not the model's fault
            raise
        member = _Member(inputs=inputs, rows=rows, arrived=time.perf_counter())
        if self._enqueue(member, batch_key(inputs)):
            return member.future
        successor = self.entry.batcher  # a reload replaced this batcher after the caller looked it up
        if successor is None or successor is self:
            raise ModelNotReady(f"model {self.entry.name} version {self.entry.version} is not ready: unloaded")
        return successor.submit(inputs)

    def _enqueue(self, member: _Member, key: tuple) -> bool:
        """Put ``member`` in a forming batch (or start one); False once closed."""
        with self._lock:
            if self._closed:
                return False
            if member.rows == 0 or member.rows > self.max_rows:  # runs alone, not merged and not refused
                self._workers.submit(self._run_alone, member)
                return True
            if self._waiting >= self.entry.max_queue:
                raise Overloaded(f"model {self.entry.name} version {self.entry.version} has "
                                 f"{self._waiting} requests waiting to be batched (max_queue)")
            self._waiting += 1
            batch = next((b for b in self._open if b.key == key and b.rows + member.rows <= self.max_rows), None)
            if batch is None:
                batch = _Batch(key=key, ready=threading.Condition(self._lock))
                self._open.append(batch)
                batch.add(member, self.preferred)
                self._workers.submit(self._lead, batch)
            else:
                batch.add(member, self.preferred)
                if batch.rows >= self.max_rows or batch.cut:
                    batch.ready.notify()
            return True

    def close(self) -> None:
        """Take no new requests (they go to the entry's new batcher); queued batches still run."""
        with self._lock:
            self._closed = True

    def _lead(self, batch: _Batch) -> None:
        """On a worker: wait until the batch is full, reaches a preferred size or its
        first request has waited max_queue_delay_us; take a slot; run it."""
        deadline = batch.members[0].arrived + self.delay_s
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
            self._run_guarded(model, self._close(batch, deadline))
        finally:
            self.entry.release()

    def _run_guarded(self, model: "LoadedModel", members: list[_Member]) -> None:
        try:
            self._run(model, members)
        except Exception as exc:  # a fault here must not leave requests waiting for ever
            self._deliver_error([m for m in members if not m.future.done()], self._as_edged(exc), ran=False)

    def _close(self, batch: _Batch, deadline: float) -> list[_Member]:
        """Take ``batch`` out of the forming ones. Before its deadline, only its
        largest preferred size goes; the rest forms a new batch."""
        with self._lock:
            self._open.remove(batch)
            members = batch.members
            if 0 < batch.cut < len(members) and time.perf_counter() < deadline:
                members, rest = members[:batch.cut], members[batch.cut:]
                again = _Batch(key=batch.key, ready=threading.Condition(self._lock))
                for member in rest:
                    again.add(member, self.preferred)
                self._open.append(again)
                self._workers.submit(self._lead, again)
            self._waiting -= len(members)
            return members

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
            member.future.set_result(BatchedResult(outputs=part, queued_s=started - member.arrived, run_s=run_s,
                                                   batch_rows=sum(rows)))

    def _run_alone(self, member: _Member) -> None:
        try:
            model, _ = self.entry.acquire()
        except EdgedError as exc:
            self._deliver_error([member], exc, ran=False)
            return
        try:
            self._run_guarded(model, [member])
        finally:
            self.entry.release()

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
            member.future.set_exception(copy.copy(exc))  # each request raises its own instance

    def _observe(self, rows: int, requests: int) -> None:
        if self.metrics is not None:
            self.metrics.rows.labels(self.entry.name, self.entry.version).observe(rows)
            self.metrics.requests.labels(self.entry.name, self.entry.version).observe(requests)
