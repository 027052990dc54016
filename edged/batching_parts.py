"""The parts of dynamic batching (``edged.batching``) that its thread path and its
event-loop path (``edged.batching_loop``) share: what a request is in a batch, the
key that decides which requests merge, merging and splitting along dim 0, and handing
each request its outcome."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from edged.errors import EdgedError, InferenceFailed, InvalidInput

log = logging.getLogger("edged.batching")

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
class Member:
    inputs: dict[str, np.ndarray]
    rows: int
    arrived: float
    future: "Future | Reply" = field(default_factory=Future)


class Reply:
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


def settle(future: asyncio.Future, outcome: BatchedResult | EdgedError) -> None:
    if future.done():  # its waiter was cancelled
        return
    if isinstance(outcome, EdgedError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class Batch:
    key: tuple
    ready: threading.Condition | None  # notified when the batch may go before its deadline (thread path)
    members: list[Member] = field(default_factory=list)
    rows: int = 0
    cut: int = 0  # leading members whose rows sum to the largest preferred size reached

    def add(self, member: Member, preferred: frozenset[int]) -> None:
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


def deliver(members: list[Member], outcomes: list[BatchedResult | EdgedError]) -> None:
    """Each member's future gets its outcome; an error as its own instance. A future
    already done (its waiter cancelled) is left alone."""
    for member, outcome in zip(members, outcomes):
        future = member.future
        if future.done():
            continue
        try:
            if isinstance(outcome, EdgedError):
                future.set_exception(copy.copy(outcome))  # each request raises its own instance
            else:
                future.set_result(outcome)
        except InvalidStateError:  # cancelled by its waiter since done() said no: the others still get theirs
            pass
