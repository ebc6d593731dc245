"""What the client raises: one base class, one exception per kind of error.

Every error of a client operation is a :class:`RegistryClientError` with ``status`` (the HTTP
status, 0 when no HTTP answer is involved), ``code`` (the server's machine-readable code, or the
client's own), ``message`` and ``details``. Errors the server answered (``{"error": {"code",
"message", "details"}}`` with a 4xx/5xx) are :class:`RegistryAPIError` subclasses chosen by the
status, in one place (:func:`error_from_response`), with the statuses of the server's own domain
errors (``registry.errors``)::

    RegistryClientError
    ├── RegistryAPIError            the server answered with an error
    │   ├── BadRequest 400, Unauthorized 401, Forbidden 403, NotFound 404, RequestTimeout 408,
    │   │   Conflict 409, Gone 410, PayloadTooLarge 413, RangeNotSatisfiable 416, InvalidInput 422
    │   ├── ServerError 5xx ── DataCorrupt (500 data_corrupt), Unavailable 503
    │   ├── JobFailed               a job ended failed or cancelled (status 0, the job's error code)
    │   └── ChecksumMismatch        downloaded bytes do not hash to their sha256 (status 0)
    └── ServerUnreachable           no answer at all (retried for ``retry_seconds`` first)

``RegistryConnectionError`` is another name for :class:`ServerUnreachable`.
"""

from __future__ import annotations

import json
from typing import Any

from . import errors as server


class RegistryClientError(Exception):
    """Base of every error a client operation raises."""

    status: int = 0
    code: str = "error"

    def __init__(self, status: int | None = None, code: str | None = None, message: str = "",
                 details: Any = None) -> None:
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.message = message
        self.details = details if details is not None else {}
        super().__init__(f"{self.status} {self.code}: {message}" if self.status else f"{self.code}: {message}")

    def to_dict(self) -> dict[str, Any]:
        """``{"error": {"code", "message", "details", "status"}}``: the server's error body, plus the status."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details, "status": self.status}}


class RegistryAPIError(RegistryClientError):
    """The server answered with an error (or reported one: a failed job, wrong bytes)."""


class BadRequest(RegistryAPIError):
    status, code = server.BadRequest.status, server.BadRequest.code


class Unauthorized(RegistryAPIError):
    status, code = server.Unauthorized.status, server.Unauthorized.code


class Forbidden(RegistryAPIError):
    status, code = server.Forbidden.status, server.Forbidden.code


class NotFound(RegistryAPIError):
    status, code = server.NotFound.status, server.NotFound.code


class RequestTimeout(RegistryAPIError):
    status, code = server.RequestTimeout.status, server.RequestTimeout.code


class Conflict(RegistryAPIError):
    status, code = server.Conflict.status, server.Conflict.code


class Gone(RegistryAPIError):
    status, code = server.Gone.status, server.Gone.code


class PayloadTooLarge(RegistryAPIError):
    status, code = server.PayloadTooLarge.status, server.PayloadTooLarge.code


class RangeNotSatisfiable(RegistryAPIError):
    status, code = server.RangeNotSatisfiable.status, server.RangeNotSatisfiable.code


class InvalidInput(RegistryAPIError):
    status, code = server.InvalidInput.status, server.InvalidInput.code


class ServerError(RegistryAPIError):
    """A 5xx: the registry's fault, not the request's."""

    status, code = 500, "server_error"


class DataCorrupt(ServerError):
    status, code = server.DataCorrupt.status, server.DataCorrupt.code


class Unavailable(ServerError):
    status, code = server.Unavailable.status, server.Unavailable.code


class JobFailed(RegistryAPIError):
    """A job ended ``failed`` or ``cancelled`` (``status`` 0: no HTTP error; ``code`` is the job's
    error code, ``message`` says which job and why)."""

    status, code = 0, "job_failed"


class ChecksumMismatch(RegistryAPIError):
    """Downloaded bytes do not hash to the sha256 the registry recorded (nothing is kept)."""

    status, code = 0, "checksum_mismatch"


class ServerUnreachable(RegistryClientError):
    """No answer from the registry (connection refused or broken, 502/503/504 from a proxy),
    after retrying for ``retry_seconds``."""

    status, code = 0, "server_unreachable"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(None, None, message, details)


RegistryConnectionError = ServerUnreachable

_BY_STATUS: dict[int, type[RegistryAPIError]] = {
    cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, RequestTimeout, Conflict, Gone,
                                PayloadTooLarge, RangeNotSatisfiable, InvalidInput, Unavailable)}
_BY_CODE: dict[str, type[RegistryAPIError]] = {DataCorrupt.code: DataCorrupt}


def error_for(status: int, code: str, message: str, details: Any = None) -> RegistryAPIError:
    """The exception for an error the server answered with ``status`` and ``code``."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else RegistryAPIError)
    return cls(status, code, message, details)


def error_from_response(status: int, body: bytes) -> RegistryAPIError:
    """The exception for an HTTP answer ``status`` >= 400 with ``body`` (the registry's
    ``{"error": {...}}``, or whatever a proxy in between sent)."""
    try:
        err = json.loads(body)["error"]
        return error_for(status, str(err.get("code") or "error"), str(err.get("message") or ""), err.get("details"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return error_for(status, "http_error", body[:500].decode("utf-8", "replace"))
