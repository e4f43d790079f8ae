"""One exception tree, one error body.

    APIError                      {"error": {"message", "type", "param", "code"}}
     ├── InvalidRequestError      400  bad JSON, bad fields, prompt too long (param names the field)
     ├── AuthenticationError      401
     ├── PermissionDeniedError    403  an admin-only route, a foreign Origin
     ├── NotFoundError            404  unknown model or route
     ├── MethodNotAllowedError    405
     ├── RequestTimeoutError      408  headers or body sent too slowly (serve.http)
     ├── RequestTooLargeError     413  body over serve.max_request_bytes
     ├── HeadersTooLargeError     431  request line or headers over serve.http's limits (414 for the line)
     ├── UnsupportedMediaTypeError 415 a JSON route called without `Content-Type: application/json`
     ├── OverloadedError          429  queue full (Retry-After)
     ├── RateLimitError           429  a tenant's requests or tokens per minute (x-ratelimit-* headers too)
     ├── QuotaExceededError       429  a tenant's tokens per day (insufficient_quota)
     ├── UnavailableError         503  no replica can take it (Retry-After)
     └── InternalError            500  anything else; the message shown to users is generic

`code` is always a string (OpenAI's own codes where one exists, e.g. "model_not_found").
"""

from __future__ import annotations

import logging
import math
import re
from http import HTTPStatus
from typing import Any


logger = logging.getLogger("raylm.serve")


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    default_code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Retry-After in whole seconds (RFC 9110); retry-after-ms is what OpenAI's SDKs read first.
        return {"Retry-After": str(max(1, round(self.retry_after))),
                "retry-after-ms": str(max(1, math.ceil(self.retry_after * 1000)))}


class InvalidRequestError(APIError):
    status, type, default_code = 400, "invalid_request_error", "invalid_value"


class AuthenticationError(APIError):
    status, type, default_code = 401, "authentication_error", "invalid_api_key"


class PermissionDeniedError(APIError):
    status, type, default_code = 403, "permission_error", "permission_denied"


class RequestTimeoutError(APIError):
    status, type, default_code = 408, "invalid_request_error", "request_timeout"


class HeadersTooLargeError(APIError):
    status, type, default_code = 431, "invalid_request_error", "headers_too_large"


class UnsupportedMediaTypeError(APIError):
    status, type, default_code = 415, "invalid_request_error", "unsupported_media_type"


class NotFoundError(APIError):
    status, type, default_code = 404, "invalid_request_error", "not_found"


class MethodNotAllowedError(APIError):
    status, type, default_code = 405, "invalid_request_error", "method_not_allowed"


class RequestTooLargeError(APIError):
    status, type, default_code = 413, "invalid_request_error", "request_too_large"

    def __init__(self, limit: int, what: str = "the request body", setting: str = "serve.max_request_bytes") -> None:
        super().__init__(f"{what} is larger than {limit:,} bytes ({setting})")


class OverloadedError(APIError):
    status, type, default_code = 429, "rate_limit_error", "overloaded"


class RateLimitError(APIError):
    """A tenant's quota (serve.tenants.*.requests_per_minute, tokens_per_minute): OpenAI's shape for it."""
    status, type, default_code = 429, "requests", "rate_limit_exceeded"


class QuotaExceededError(APIError):
    """A tenant's daily token budget is spent (tokens_per_day)."""
    status, type, default_code = 429, "insufficient_quota", "insufficient_quota"


class UnavailableError(APIError):
    status, type, default_code = 503, "service_unavailable", "service_unavailable"


class InternalError(APIError):
    status, type, default_code = 500, "server_error", "internal_error"


class ConfigError(ValueError):
    """A config that can never start (an unknown engine argument, ...): retrying the replica cannot help, so
    the control plane stops at the first one (its message carries CONFIG_ERROR)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{CONFIG_ERROR} {message}")


CONFIG_ERROR = "[raylm config error]"
# A line that ends a Python traceback: `ValueError: ...`, `torch.OutOfMemoryError: ...`.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception): \S")


def exception_lines(text: str) -> list[str]:
    """The lines of `text` that end a Python traceback (the exception and its message), stripped."""
    return [line.strip() for line in text.splitlines() if _EXCEPTION_LINE.match(line.strip())]


def public_error(exc: Exception, request_id: str) -> APIError:
    """Any exception as the APIError a client may see: client errors as they are; anything else is logged
    with the request id and answered as a 500 that hides it."""
    if isinstance(exc, APIError) and not isinstance(exc, InternalError):
        return exc
    logger.error("request %s failed: %r", request_id, exc, exc_info=exc)
    return InternalError(f"internal error (request id {request_id})")


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    405: MethodNotAllowedError, 408: RequestTimeoutError, 415: UnsupportedMediaTypeError, 429: OverloadedError,
    431: HeadersTooLargeError, 503: UnavailableError,
}


def from_status(status: int, message: str, param: str | None = None) -> APIError:
    """Map an engine's (status, message) onto our tree; unknown 4xx stay 4xx, the rest become 500."""
    cls = _BY_STATUS.get(status)
    if cls is None and 400 <= status < 500:
        err = InvalidRequestError(message, param=param, code=HTTPStatus(status).phrase.lower().replace(" ", "_"))
        err.status = status
        return err
    if cls is None:
        return InternalError(message)
    code = "context_length_exceeded" if "maximum context length" in message else None
    return cls(message, param=param, code=code)


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")


def validation_error(exc: Exception) -> InvalidRequestError:
    """A pydantic ValidationError as a 400 that names the first offending field."""
    errors = getattr(exc, "errors", lambda: [])()
    if not errors:
        return InvalidRequestError(str(exc))
    first = errors[0]
    # Keep field names and indices; drop pydantic's validator and union-branch tags ("list[int]", ...).
    loc = [str(p) for p in first.get("loc", ()) if isinstance(p, int) or _FIELD.fullmatch(str(p))]
    param = ".".join(loc) or None
    message = first.get("msg", str(exc))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return InvalidRequestError(message, param=param, code="invalid_type" if "type" in first.get("type", "") else None)
