"""Dynamic batches formed on an event loop (``Batcher.join_on_loop``).

A small request (at most ``max_batch_size`` rows and LOOP_MAX_BYTES of inputs) to a
model whose batches typically run within the transport's ``inline_max_us`` joins a
batch forming on the loop that received it, by the rules of the thread path
(``edged.batching``: same key, rows within ``max_batch_size``, validated before it
joins). The first request of a batch schedules its flush: at the loop's next step for
a ``max_queue_delay_us`` of 0 (the requests read in the same step join it), else after
that delay; the batch goes at once when it is full or reaches a preferred size. The
flush runs the batch on the loop, as the data plane runs a cheap unbatched request
there: no thread hop, no wake-up per request. A batch whose model has grown slow
since its requests joined runs in one of the batcher's worker threads instead and
comes back with one hop for the whole batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edged.batching_parts import Batch, Member, deliver

if TYPE_CHECKING:
    from edged.batching import Batcher

LOOP_MAX_BYTES = 64 * 1024  # as edged.dataplane.INLINE_MAX_BYTES: larger inputs never run on a loop


def fits_loop(batcher: "Batcher", inputs: dict[str, np.ndarray], rows: int, inline_max_us: float) -> bool:
    """Whether a request of ``rows`` rows batches on the event loop: small inputs, rows
    that can merge, and a model whose batches typically run within ``inline_max_us``."""
    if inline_max_us <= 0 or rows < 1 or rows > batcher.max_rows:
        return False
    typical = batcher.typical_run_s
    if typical is None or typical * 1e6 > inline_max_us:
        return False
    size = 0
    for array in inputs.values():
        size += array.nbytes
    return size <= LOOP_MAX_BYTES


@dataclass
class LoopBatch(Batch):
    flush: asyncio.Handle | None = None  # the scheduled flush (the delay's end or the next loop step)


class LoopBatches:
    """The batches of one batcher forming on one event loop; used on that loop only."""

    def __init__(self, batcher: "Batcher", loop: asyncio.AbstractEventLoop) -> None:
        self.batcher = batcher
        self.loop = loop
        self.inline_max_us = 0.0  # the last joiner's: whether a flush runs here or in a worker
        self._open: list[LoopBatch] = []

    def join(self, member: Member, key: tuple, inline_max_us: float) -> None:
        """Put ``member`` (counted as waiting) in a forming batch or start one; a batch
        that this makes full, or of a preferred size, goes at once."""
        batcher = self.batcher
        self.inline_max_us = inline_max_us
        batch = None
        for candidate in self._open:
            if candidate.key == key and candidate.rows + member.rows <= batcher.max_rows:
                batch = candidate
                break
        if batch is None:
            batch = LoopBatch(key=key, ready=None)
            self._open.append(batch)
            batch.add(member, batcher.preferred)
            if batch.rows < batcher.max_rows and not batch.cut:
                delay = batcher.delay_s
                batch.flush = (self.loop.call_soon(self.flush, batch) if delay <= 0
                               else self.loop.call_later(delay, self.flush, batch))
                return
        else:
            batch.add(member, batcher.preferred)
            if batch.rows < batcher.max_rows and not batch.cut:
                return
        self.flush(batch)

    def flush(self, batch: LoopBatch) -> None:
        """Send ``batch``: run on the loop, or in a worker while its model is slow."""
        if batch.flush is not None:
            batch.flush.cancel()
            batch.flush = None
        self._open.remove(batch)
        batcher = self.batcher
        members = batch.members
        with batcher._lock:
            batcher._count_waiting(-len(members))
        typical = batcher.typical_run_s
        if typical is not None and typical * 1e6 <= self.inline_max_us:
            deliver(members, batcher.run_in_slot(members))
        else:
            batcher._workers.submit(self._run_in_worker, members)

    def _run_in_worker(self, members: list[Member]) -> None:
        outcomes = self.batcher.run_in_slot(members)
        try:
            self.loop.call_soon_threadsafe(deliver, members, outcomes)  # one hop for the whole batch
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass
