"""Reading big request bodies and giving their memory back: helpers of the HTTP transport."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

READ_BYTES = 4 << 20  # socket reads for a big body: up to this much at once


def find_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` from the process's own symbols (no ``find_library``:
    that runs ``ldconfig`` in a subprocess, 1.5 to 4 ms), or False (musl)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(trim_bytes: int = 256 << 20, mmap_bytes: int = 64 << 20) -> bool:
    """glibc: blocks freed by big requests (bodies, their tensors) stay in the heap
    while requests come, instead of going back to the OS after each one (a 3 MB JSON
    body took ~800 page faults a request, ~1 ms of its ~10 ms CPU); the idle
    ``malloc_trim`` hands them back. Both settings are needed: setting one freezes
    glibc's adaptive value of the other. False where there is no ``mallopt`` (musl)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, trim_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes))


@contextmanager
def big_reads(transport: Any, length: int | None) -> Iterator[None]:
    """Socket reads of up to READ_BYTES while a big body arrives. asyncio reads at
    most 256 KiB a loop turn, so a 3 MB body took a dozen turns, each waiting for the
    GIL while a thread decoded another body (8 clients with 3 MB JSON bodies: 5 to
    50% more requests per second, interleaved). Only for this body: the transport's
    own size comes back after it; transports without ``max_size`` (uvloop, TLS) are
    left as they are."""
    size = min(length or 0, READ_BYTES)
    if size <= getattr(transport, "max_size", size):
        yield
        return
    transport.max_size = size
    try:
        yield
    finally:
        del transport.max_size  # the class's own value again
