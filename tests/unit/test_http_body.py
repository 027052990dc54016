"""keep_freed_memory: glibc keeps freed big blocks in the heap (checked in a child
process, whose malloc settings the test may change)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import ctypes, json, sys
from edged.transports.http_body import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = libc.malloc(32 << 20)  # a big request body's worth
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"kept": kept, "mmapped_during": during.hblkhd - before.hblkhd, "heap_free_after": after.fordblks}))
"""


def _child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_blocks_stay_in_the_heap_after_keep_freed_memory():
    default, kept = _child("default"), _child("keep")
    assert default["mmapped_during"] >= 32 << 20  # glibc's default: a block this big is its own mapping...
    assert default["heap_free_after"] < 32 << 20  # ...given back to the OS when freed
    assert kept["kept"] is True
    assert kept["mmapped_during"] == 0  # from the heap, and kept there once freed for the next request
    assert kept["heap_free_after"] >= 32 << 20
