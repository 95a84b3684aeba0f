"""The gateway's error tree.

Every error the gateway produces itself is one of these. Each knows its HTTP
status and its OpenAI error ``type``/``code``, so the HTTP layer renders them
all the same way: ``{"error": {"message", "type", "param", "code"}}``.
Library errors (the HTTP client's, redis, yaml) are translated into these at the edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

Header = tuple[bytes, bytes]


class ProxyError(Exception):
    """Base of every error the gateway answers with."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[Header] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: tuple[Header, ...] = tuple(headers)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class InvalidRequestError(ProxyError):
    status = 400
    type = "invalid_request_error"
    model: str | None = None  # the model a refused chat body named, for the metrics' model label


class RequestTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class RequestHeaderFieldsTooLargeError(InvalidRequestError):
    status = 431
    code = "request_header_fields_too_large"


class RequestTimeoutError(InvalidRequestError):
    status = 408
    code = "request_timeout"


class AuthenticationError(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(ProxyError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFoundError(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class MethodNotAllowedError(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimitError(ProxyError):
    """A quota denied the request; ``type`` names the kind of limit."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit_type: str = "requests",
        limit: str = "",
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[Header] = (),
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.type = limit_type
        self.limit = limit  # which limit denied: rpm, tpm, concurrency, tokens_per_day, ...


class UpstreamError(ProxyError):
    """Every candidate upstream failed (errors, 5xx, 429)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamConnectionError(UpstreamError):
    """An upstream could not be reached, or its connection broke.

    ``message`` (what a client may read) says what happened; ``detail`` adds
    where (the address, the proxy by its URL without credentials) and why
    (TLS's reason, the proxy's answer) for the log, the attempt span and
    ``/admin/upstreams``. Neither holds a secret."""

    code = "upstream_connection_error"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


class UpstreamStreamError(UpstreamError):
    """A stream broke, stalled or ended early after the client got its first byte."""

    code = "upstream_stream_error"


class UpstreamRateLimitError(ProxyError):
    """Every candidate upstream is cooling down after a 429 of its own."""

    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"


class NoUpstreamAvailableError(ProxyError):
    """No candidate could be tried: all cooling down, ejected or saturated."""

    status = 503
    type = "server_error"
    code = "no_upstream_available"


class ServiceUnavailableError(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ServerShuttingDownError(ServiceUnavailableError):
    """The gateway is shutting down and its grace for open streams ran out."""

    code = "server_shutting_down"


class UpstreamTimeoutError(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class InternalError(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"


class ConfigError(Exception):
    """A config file is invalid; ``problems`` lists each one with its path."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)
