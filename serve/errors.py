"""Errors the server answers with: each carries its HTTP status and OpenAI error type."""

from __future__ import annotations

from typing import Any

from adapterctl.core.errors import AdaptersError
from adapterctl.serve.engines.base import AdapterLoadFailed, EngineError, EngineUnavailable, InvalidRequest


class ServeError(AdaptersError):
    """A request the server refuses; the HTTP layer turns it into an OpenAI-shaped JSON error."""

    status = 500
    kind = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, when one is

    def body(self) -> dict[str, Any]:
        """The error as OpenAI's API spells it."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the body."""
        return {}


class BadRequest(ServeError):
    """Malformed or out-of-limits input."""

    exit_code = 2
    status = 400
    kind = "invalid_request_error"


class Unauthorized(ServeError):
    """A missing or unknown API key."""

    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServeError):
    """A valid key without the right to this endpoint (admin endpoints)."""

    status = 403
    kind = "permission_error"


class AdapterNotFound(ServeError):
    """No such adapter or version for this caller (another tenant's adapters look the same)."""

    exit_code = 6
    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"


class AdapterRejected(ServeError):
    """An adapter this server cannot serve: other base, non-safetensors weights, rank too high, bad shapes."""

    exit_code = 8
    status = 422
    kind = "invalid_request_error"
    code = "adapter_rejected"


class TooManyRequests(ServeError):
    """The tenant is over its concurrency or token-rate limit; RETRY_AFTER seconds, when known, go in Retry-After."""

    status = 429
    kind = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class Unavailable(ServeError):
    """The server is starting or draining."""

    status = 503
    kind = "server_error"


class RegistryUnavailable(Unavailable):
    """The adapter registry cannot be read (its folder gone, git failing)."""

    exit_code = 5


class PayloadTooLarge(ServeError):
    """A request body over the server's size limit, refused before it is read whole."""

    status = 413
    kind = "invalid_request_error"
    code = "request_too_large"


def from_engine(exc: EngineError) -> ServeError:
    """An engine's error as the HTTP error the client gets."""
    if isinstance(exc, InvalidRequest):
        return BadRequest(str(exc), param=exc.param)
    if isinstance(exc, AdapterLoadFailed):
        return AdapterRejected(str(exc))
    if isinstance(exc, EngineUnavailable):
        return Unavailable(str(exc))
    return ServeError(str(exc))
