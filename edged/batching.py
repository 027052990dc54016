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

Callers on an event loop use :meth:`Batcher.join_on_loop` (or ``submit_async``): a
small request for a model whose batches run quickly forms its batch on that loop and
runs there (``edged.batching_loop``), with no thread hop at all; the rules above are
the same, and their parts are shared (``edged.batching_parts``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Awaitable, Callable

import numpy as np

from edged.batching_loop import LoopBatches, fits_loop
from edged.batching_parts import (BATCH_BUCKETS, Batch, BatchedResult, BatchMetrics, Member, Reply, batch_key,
                                  batch_rows, deliver, merge, settle, split)
from edged.config import ModelSettings
from edged.errors import EdgedError, InferenceFailed, InvalidInput, ModelNotReady, Overloaded
from edged.metrics import fast_observe

if TYPE_CHECKING:
    from edged.model import LoadedModel
    from edged.model_entry import ModelEntry

log = logging.getLogger(__name__)

VALID_KEYS = 64  # batch keys remembered as valid, per batcher
OUTLIER_FACTOR = 2.0  # as edged.dataplane's: a run counts at most this many times the typical one
__all__ = ["BATCH_BUCKETS", "BatchMetrics", "BatchedResult", "Batcher", "batch_key", "batch_rows", "merge", "split"]


class Batcher:
    """The dynamic batcher of one model version (``entry``). Batches run on its own
    ``max_concurrency`` worker threads, which also wait out the queue delay, or on the
    event loop of their requests (:meth:`join_on_loop`)."""

    def __init__(self, entry: "ModelEntry", settings: ModelSettings, metrics: BatchMetrics | None = None) -> None:
        self.entry = entry
        self.max_rows = settings.max_batch_size
        self.delay_s = settings.max_queue_delay_us / 1e6
        self.preferred = frozenset(settings.preferred_batch_sizes)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._open: list[Batch] = []
        self._waiting = 0  # requests in batches that have not started running
        self._closed = False  # replaced by a reload or unloaded: new requests go elsewhere
        self._typical_run_s: float | None = None  # moving average of a batch's CPU time in its thread
        self._loops: dict = {}  # event loop -> its LoopBatches (requests batched on that loop)
        self._valid_keys: dict[tuple, "LoadedModel"] = {}  # batch key -> the model it passed validation for
        self._observe_rows = self._observe_requests = None
        if metrics is not None:  # resolved once: labels() locks and builds a tuple per call
            self._observe_rows = fast_observe(metrics.rows.labels(entry.name, entry.version))
            self._observe_requests = fast_observe(metrics.requests.labels(entry.name, entry.version))
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
        if self._join_loop(inputs, rows, key, inline_max_us, partial(settle, future)):
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
        if not fits_loop(self, inputs, rows, inline_max_us):
            return False
        with self._lock:
            closed = self._closed
            if not closed:
                self._count_waiting(1)
        if closed:  # checked again for the successor's model
            return self.successor().join_on_loop(inputs, inline_max_us, reply)
        loop = asyncio.get_running_loop()
        batches = self._loops.get(loop)
        if batches is None:
            batches = self._loops[loop] = LoopBatches(self, loop)
        batches.join(Member(inputs=inputs, rows=rows, arrived=time.perf_counter(), future=Reply(reply)),
                     key, inline_max_us)
        return True

    def _submit_admitted(self, inputs: dict[str, np.ndarray], rows: int, key: tuple) -> Future:
        member = Member(inputs=inputs, rows=rows, arrived=time.perf_counter())
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

    def _enqueue(self, member: Member, key: tuple) -> bool:
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
                batch = Batch(key=key, ready=threading.Condition(self._lock))
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

    def _lead(self, batch: Batch) -> None:
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
            members = self._close(batch, deadline)
            deliver(members, [exc] * len(members))
            return
        try:
            members = self._close(batch, deadline)
            deliver(members, self._guarded_outcomes(model, members))
        finally:
            self.entry.release()

    def run_in_slot(self, members: list[Member]) -> list[BatchedResult | EdgedError]:
        """Each member's outcome of one run of their batch in a concurrency slot of the model."""
        try:
            model, _ = self.entry.acquire()
        except EdgedError as exc:  # not ready any more, or overloaded: nothing ran
            return [exc] * len(members)
        try:
            return self._guarded_outcomes(model, members)
        finally:
            self.entry.release()

    def _guarded_outcomes(self, model: "LoadedModel", members: list[Member]) -> list[BatchedResult | EdgedError]:
        try:
            return self.outcomes(model, members)
        except Exception as exc:  # a fault here must not leave requests waiting for ever
            return [self._as_edged(exc)] * len(members)

    def _close(self, batch: Batch, deadline: float) -> list[Member]:
        """Take ``batch`` out of the forming ones. Before its deadline, only its
        largest preferred size goes; the rest forms a new batch."""
        with self._lock:
            self._open.remove(batch)
            members = batch.members
            if 0 < batch.cut < len(members) and time.perf_counter() < deadline:
                members, rest = members[:batch.cut], members[batch.cut:]
                again = Batch(key=batch.key, ready=threading.Condition(self._lock))
                for member in rest:
                    again.add(member, self.preferred)
                self._open.append(again)
                self._workers.submit(self._lead, again)
            self._waiting -= len(members)
            return members

    def outcomes(self, model: "LoadedModel", members: list[Member]) -> list[BatchedResult | EdgedError]:
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

    def _run_alone(self, member: Member) -> None:
        deliver([member], self.run_in_slot([member]))

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

    def _observe(self, rows: int, requests: int) -> None:
        if self._observe_rows is not None:
            self._observe_rows(rows)
            self._observe_requests(requests)
