"""Domain errors. Each maps to one HTTP status and a stable machine-readable ``code``.

The API turns them into ``{"error": {"code", "message", "details"}}``; the CLI prints the message.
Services raise these and nothing else for bad input, so a bug (any other exception) is a 500.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details if details is not None else {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(RegistryError):
    status = 400
    code = "bad_request"


class InvalidInput(RegistryError):
    """Well-formed request whose content is unacceptable (bad weights, shapes, names)."""

    status = 422
    code = "invalid_input"


class Unauthorized(RegistryError):
    status = 401
    code = "unauthorized"


class Forbidden(RegistryError):
    status = 403
    code = "forbidden"


class NotFound(RegistryError):
    status = 404
    code = "not_found"


class RequestTimeout(RegistryError):
    status = 408
    code = "body_timeout"


class Conflict(RegistryError):
    status = 409
    code = "conflict"


class Gone(RegistryError):
    status = 410
    code = "gone"


class PayloadTooLarge(RegistryError):
    status = 413
    code = "payload_too_large"


class RangeNotSatisfiable(RegistryError):
    status = 416
    code = "range_not_satisfiable"


class Unavailable(RegistryError):
    """A transient condition on the server's side: the same request succeeds a moment later."""

    status = 503
    code = "unavailable"


class DataCorrupt(RegistryError):
    """Stored bytes are missing or do not hash to their recorded sha256: the registry's fault,
    never the client's. The version is marked corrupt and a ``version.corrupt`` event is emitted."""

    status = 500
    code = "data_corrupt"
