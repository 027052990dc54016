"""Every error a conversion can end in, in one place, each with a code.

The CLI maps them to exit codes (``EXIT_CODES``); nothing here prints.
"""

from __future__ import annotations

from typing import Any

from edged.errors import EdgedError


class ConverterUnavailable(EdgedError):
    """The library a converter needs is not installed."""

    code = "converter_unavailable"


class ConversionError(EdgedError):
    """The source model cannot be converted (not a model, unsupported, failed)."""

    code = "conversion_failed"


class UnsupportedOp(ConversionError):
    """The source model uses an operator the converter does not handle."""

    code = "unsupported_op"


class BadInput(EdgedError):
    """The model, data or options given to ``edged convert`` are unusable."""

    code = "bad_input"


class Skipped(EdgedError):
    """This profile's target cannot be converted or run on this machine."""

    code = "skipped"


class AccuracyGateFailed(EdgedError):
    """The converted model missed the validation gate; no bundle was written."""

    code = "accuracy_drop"

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class OutputCollapsed(AccuracyGateFailed):
    """An output of the converted model is constant, near zero or not finite
    where the source model's varies: always an error, whatever the gate."""

    code = "output_collapsed"


EXIT_BAD_INPUT = 2
EXIT_ACCURACY = 3
EXIT_COLLAPSED = 4
