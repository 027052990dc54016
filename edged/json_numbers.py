"""Flat JSON lists of numbers parsed by simdjson straight into a buffer of doubles.

pysimdjson (the ``fast-json`` extra) reads a 3 MB list of 150,528 floats in about
half the time that orjson takes to make Python floats of it and numpy to read
them back. It is optional: without it :meth:`SimdNumbers.create` gives None and
:mod:`edged.v2` parses with orjson as before.

simdjson only answers what it reads exactly as the orjson path would (JSON's own
number grammar, numbers rounded once to the nearest double); whatever it refuses
(a value that is not a number, a number out of the double range, an integer over
64 bits, malformed text) comes back as None, and the caller's orjson path then
decides and names the problem as it always has.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# simdjson's errors: ValueError (malformed text, a number it cannot read),
# TypeError (a value that is not a number), RuntimeError (an integer under -2**63,
# a parser still in use) and MemoryError (no buffer for the copy).
_REFUSED = (ValueError, TypeError, RuntimeError, MemoryError)


class SimdNumbers:
    """One simdjson parser for the lists of one request body.

    A parser is not thread-safe and its documents become invalid when it parses
    again, so each decode makes its own (about 0.1 us) and reads each document's
    numbers out before the next parse."""

    def __init__(self, simdjson: Any) -> None:
        self._array_type = simdjson.Array
        self._parser = simdjson.Parser()

    @classmethod
    def create(cls) -> SimdNumbers | None:
        """A parser, or None when pysimdjson is not installed."""
        try:
            import simdjson
        except ImportError:
            return None
        return cls(simdjson)

    def doubles(self, text: bytes | bytearray | memoryview) -> np.ndarray | None:
        """The numbers of the JSON list ``text`` (brackets included) as float64,
        or None for anything simdjson refuses or that is not a flat list of numbers."""
        try:
            doc = self._parser.parse(text)
        except _REFUSED:
            return None
        try:
            if type(doc) is not self._array_type:
                return None
            # as_buffer flattens nested lists: the caller only passes lists without '['
            return np.frombuffer(doc.as_buffer(of_type="d"), np.float64)
        except _REFUSED:
            return None
        finally:
            del doc  # the parser refuses to parse again while a document of it lives
