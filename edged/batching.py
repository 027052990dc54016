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

Callers on an event loop use :meth:`Batcher.submit_async`: a small request for a model
whose batches run quickly forms its batch on the loop itself and runs there
(``edged.batching_loop``), with no thread hop at all; the rules above are the same.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Awaitable, Callable

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from edged.config import ModelSettings
from edged.errors import EdgedError, InferenceFailed, InvalidInput, ModelNotReady, Overloaded
from edged.metrics import fast_observe

if TYPE_CHECKING:
    from edged.model import LoadedModel
    from edged.model_entry import ModelEntry

log = logging.getLogger(__name__)

VALID_KEYS = 64  # batch keys remembered as valid, per batcher
OUTLIER_FACTOR = 2.0  # as edged.dataplane's: a run counts at most this many times the typical one
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


@dataclass(slots=True)
class BatchedResult:
    """One request's share of a batch, with what the per-request metrics need."""

    outputs: dict[str, np.ndarray]
    queued_s: float  # from arrival until its batch started running (slot wait included)
    run_s: float  # the batch's runtime call
    batch_rows: int  # rows in the batch it ran in


@dataclass(slots=True)
class _Member:
    inputs: dict[str, np.ndarray]
    rows: int
    arrived: float
    future: "Future | _Reply" = field(default_factory=Future)


class _Reply:
    """A loop member's future: its outcome goes to a callback at once, on the loop."""

    __slots__ = ("callback", "_done")

    def __init__(self, callback: Callable[[BatchedResult | EdgedError], None]) -> None:
        self.callback = callback
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, outcome: BatchedResult | EdgedError) -> None:
        self._done = True
        try:
            self.callback(outcome)
        except Exception:  # one caller's fault must not keep the rest of its batch waiting
            log.exception("a batched request's reply failed")

    set_exception = set_result


def _settle(future: asyncio.Future, outcome: BatchedResult | EdgedError) -> None:
    if future.done():  # its waiter was cancelled
        return
    if isinstance(outcome, EdgedError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class _Batch:
    key: tuple
    ready: threading.Condition | None  # notified when the batch may go before its deadline (thread path)
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
    if len(inputs) == 1:  # the common case, without sorting
        for name, array in inputs.items():
            return ((name, array.dtype.str, array.shape[1:]),)
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
        self._typical_run_s: float | None = None  # moving average of a loop batch's runtime call
        from edged.batching_loop import LoopBatches, fits_loop  # built on this module's classes

        self._loops: dict = {}  # event loop -> its LoopBatches
        self._valid_keys: dict[tuple, "LoadedModel"] = {}  # batch key -> the model it passed validation for
        self._observe_rows = self._observe_requests = None
        if metrics is not None:  # resolved once: labels() locks and builds a tuple per call
            self._observe_rows = fast_observe(metrics.rows.labels(entry.name, entry.version))
            self._observe_requests = fast_observe(metrics.requests.labels(entry.name, entry.version))
        self._loop_batches, self._fits_loop = LoopBatches, fits_loop
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
        return self._submit_admitted(inputs, *self.admit(inputs))

    def submit_async(self, inputs: dict[str, np.ndarray], inline_max_us: float) -> Awaitable[BatchedResult]:
        """:meth:`submit` for a caller on a running event loop: batched on this loop when
        :meth:`join_on_loop` takes the request, else by the worker threads (one hop back
        per request)."""
        future = asyncio.get_running_loop().create_future()
        rows, key = self.admit(inputs)
        if self._join_loop(inputs, rows, key, inline_max_us, partial(_settle, future)):
            return future
        return asyncio.wrap_future(self._submit_admitted(inputs, rows, key))

    def join_on_loop(self, inputs: dict[str, np.ndarray], inline_max_us: float,
                     reply: Callable[[BatchedResult | EdgedError], None]) -> bool:
        """For a caller on a running event loop: validate ``inputs`` (InvalidInput now) and,
        when they are small, of at most max_batch_size rows and for a model whose batches
        typically run within ``inline_max_us``, put them in a batch forming on this loop
        (``edged.batching_loop``); ``reply`` gets the outcome on the loop, called at most
        once. False: not taken (use :meth:`submit`)."""
        rows, key = self.admit(inputs)
        return self._join_loop(inputs, rows, key, inline_max_us, reply)

    def _join_loop(self, inputs: dict[str, np.ndarray], rows: int, key: tuple, inline_max_us: float,
                   reply: Callable[[BatchedResult | EdgedError], None]) -> bool:
        if not self._fits_loop(self, inputs, rows, inline_max_us):
            return False
        with self._lock:
            closed = self._closed
            if not closed:
                self._count_waiting(1)
        if closed:
            return self.successor()._join_loop(inputs, rows, key, inline_max_us, reply)
        loop = asyncio.get_running_loop()
        batches = self._loops.get(loop)
        if batches is None:
            batches = self._loops[loop] = self._loop_batches(self, loop)
        batches.join(_Member(inputs=inputs, rows=rows, arrived=time.perf_counter(), future=_Reply(reply)),
                     key, inline_max_us)
        return True

    def _submit_admitted(self, inputs: dict[str, np.ndarray], rows: int, key: tuple) -> Future:
        member = _Member(inputs=inputs, rows=rows, arrived=time.perf_counter())
        if self._enqueue(member, key):
            return member.future
        return self.successor().submit(inputs)

    def admit(self, inputs: dict[str, np.ndarray]) -> tuple[int, tuple]:
        """The request's rows and batch key once its inputs are valid for the model;
        InvalidInput (counted as the unbatched path counts it) or ModelNotReady."""
        model = self.entry.current_model()
        try:
            key = batch_key(inputs)
            if self._valid_keys.get(key) is not model:
                # A batched model's batch dim is dynamic: names, dtypes and the other dims
                # (the key) decide whether inputs are valid, so a key passes once per model.
                model.validate(inputs)
                if len(self._valid_keys) < VALID_KEYS:
                    self._valid_keys[key] = model
            rows = batch_rows(inputs)
        except InvalidInput:
            self.entry.count(ok=True)  # as the unbatched path counts it: not the model's fault
            raise
        return rows, key

    def successor(self) -> "Batcher":
        """The batcher that replaced this closed one (a reload after the caller looked it
        up); ModelNotReady when there is none (unloaded)."""
        successor = self.entry.batcher
        if successor is None or successor is self:
            raise ModelNotReady(f"model {self.entry.name} version {self.entry.version} is not ready: unloaded")
        return successor

    def _count_waiting(self, requests: int) -> None:
        """Requests start (+) or stop (-) waiting to be batched; Overloaded past max_queue.
        Called with ``self._lock`` held."""
        if requests > 0 and self._waiting >= self.entry.max_queue:
            raise Overloaded(f"model {self.entry.name} version {self.entry.version} has "
                             f"{self._waiting} requests waiting to be batched (max_queue)")
        self._waiting += requests

    def _enqueue(self, member: _Member, key: tuple) -> bool:
        """Put ``member`` in a forming batch (or start one); False once closed."""
        with self._lock:
            if self._closed:
                return False
            if member.rows == 0 or member.rows > self.max_rows:  # runs alone, not merged and not refused
                self._workers.submit(self._run_alone, member)
                return True
            self._count_waiting(1)
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
        """Run ``members`` as one call (see :meth:`outcomes`) and set their futures."""
        deliver(members, self.outcomes(model, members))

    def outcomes(self, model: "LoadedModel", members: list[_Member]) -> list[BatchedResult | EdgedError]:
        """Run ``members`` as one call; when that fails and there were several, each
        alone. Each member's result or error, counted and observed; the batch's run
        goes into :attr:`typical_run_s`."""
        started = time.perf_counter()
        cpu_started = time.thread_time()
        rows = [m.rows for m in members]
        try:
            outputs = split(model.infer(merge([m.inputs for m in members])), rows)
        except Exception as exc:
            if len(members) > 1:
                return [self.outcomes(model, [member])[0] for member in members]
            error = self._as_edged(exc)
            self.entry.count(ok=not isinstance(error, InferenceFailed))  # a bad request is not the model's fault
            return [error]
        run_s = time.perf_counter() - started
        self._note_run(time.thread_time() - cpu_started)
        total = sum(rows)
        self._observe(total, len(members))
        results: list[BatchedResult | EdgedError] = []
        for member, part in zip(members, outputs):
            self.entry.count(ok=True)
            results.append(BatchedResult(outputs=part, queued_s=started - member.arrived, run_s=run_s,
                                         batch_rows=total))
        return results

    @property
    def typical_run_s(self) -> float | None:
        """How long a batch typically holds the thread that runs it: the moving average
        of the runs' CPU time in that thread (a run the OS paused, or one that waited for
        the GIL in a worker, does not count its wait), at first the model's warm-up run;
        None when unknown."""
        typical = self._typical_run_s
        if typical is None:
            model = self.entry.model
            typical = None if model is None else model.warm_latency_s
        return typical

    def _note_run(self, seconds: float) -> None:
        """As the data plane's inline average: one odd run lifts it by 10 % at most."""
        typical = self.typical_run_s
        if typical is None or typical <= 0:
            self._typical_run_s = seconds
        else:
            self._typical_run_s = 0.9 * typical + 0.1 * min(seconds, OUTLIER_FACTOR * typical)

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
        if ran:  # counted as the unbatched path counts it: a bad request is not the model's fault
            for _ in members:
                self.entry.count(ok=not isinstance(exc, InferenceFailed))
        deliver(members, [exc] * len(members))

    def _observe(self, rows: int, requests: int) -> None:
        if self._observe_rows is not None:
            self._observe_rows(rows)
            self._observe_requests(requests)


def deliver(members: list[_Member], outcomes: list[BatchedResult | EdgedError]) -> None:
    """Each member's future gets its outcome; an error as its own instance. A future
    already done (its waiter cancelled) is left alone."""
    for member, outcome in zip(members, outcomes):
        future = member.future
        if future.done():
            continue
        if isinstance(outcome, EdgedError):
            future.set_exception(copy.copy(outcome))  # each request raises its own instance
        else:
            future.set_result(outcome)
