"""One error hierarchy for the whole daemon.

Errors carry a stable string ``code`` and a human message. They never carry
transport status codes: each transport maps codes to its own statuses in one
place (see ``edged.transports.http.STATUS_BY_CODE``).
"""

from __future__ import annotations


class EdgedError(Exception):
    """Base class. ``code`` is stable and machine-readable."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(EdgedError):
    """A request is malformed or does not match the model's inputs."""

    code = "invalid_input"


class ModelNotFound(EdgedError):
    """No model or version with that name is known."""

    code = "model_not_found"


class ModelNotReady(EdgedError):
    """The model is known but cannot serve (loading, failed, unloaded)."""

    code = "model_not_ready"


class PayloadTooLarge(EdgedError):
    """The request body is over the configured limit."""

    code = "payload_too_large"


class Overloaded(EdgedError):
    """The model's concurrency limit and queue are full."""

    code = "overloaded"


class RuntimeUnavailable(EdgedError):
    """The backend library a bundle needs is not installed."""

    code = "runtime_unavailable"


class BundleError(EdgedError):
    """A bundle is malformed, tampered with, or unsafe to unpack."""

    code = "bundle_invalid"


class ConfigError(EdgedError):
    """A configuration file or value is invalid."""

    code = "config_invalid"


class InferenceFailed(EdgedError):
    """The runtime raised while running the model."""

    code = "inference_failed"


class SignatureError(EdgedError):
    """A bundle is unsigned, signed by an unknown key, or its signature is wrong."""

    code = "signature_invalid"


class UpdateRefused(EdgedError):
    """An OTA update was refused (downgrade, bad message, failed self-test, no disk space)."""

    code = "update_refused"


class UpdateFailed(EdgedError):
    """An OTA update failed for a reason that may pass on retry (download, I/O)."""

    code = "update_failed"
