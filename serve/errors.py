"""The one error table: error class (``models.errors``) -> HTTP status and OpenAI error ``type``.

Everything the service reports goes through ``as_service_error`` and ``error_body``, so a status
is decided in exactly one place. Unknown exceptions become ``500 internal_error`` with no traceback
in the body (the traceback goes to the log).
"""

from __future__ import annotations

import logging

from models.errors import (
    Conflict,
    Forbidden,
    InferenceTimeout,
    InvalidRequest,
    MethodNotAllowed,
    ModelLoadError,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)

log = logging.getLogger("loraserve")


class ReplicaFailed(ServiceError):
    """The gateway's 502: the replica closed the connection before it answered (it died)."""

    code = "replica_failed"


class NoReplica(ServiceError):
    """The gateway's 503: no replica could take the request (none up, or all marked down)."""

    code = "no_replica"


class ReplicaTimeout(ServiceError):
    """The gateway's 504: no answer from the replica within the server timeout."""

    code = "replica_timeout"


# Most specific first: the first class an exception is an instance of decides.
ERROR_TABLE: tuple[tuple[type[ServiceError], int, str], ...] = (
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (PayloadTooLarge, 413, "invalid_request_error"),
    (UnsupportedMediaType, 415, "invalid_request_error"),
    (MethodNotAllowed, 405, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (NotFound, 404, "not_found_error"),
    (Conflict, 409, "invalid_request_error"),
    (InferenceTimeout, 408, "timeout_error"),
    (Overloaded, 503, "service_unavailable_error"),
    (NotReady, 503, "service_unavailable_error"),
    (ModelLoadError, 503, "service_unavailable_error"),
    (NoReplica, 503, "service_unavailable_error"),
    (ReplicaFailed, 502, "internal_error"),
    (ReplicaTimeout, 504, "timeout_error"),
    (ServiceError, 500, "internal_error"),
)


def unwrap(exc: BaseException) -> BaseException:
    """Errors raised in another Ray replica arrive wrapped; return the original."""
    cause = getattr(exc, "cause", None)
    if cause is not None and type(exc).__name__.startswith("RayTaskError"):
        return cause
    return exc


def as_service_error(exc: BaseException) -> ServiceError:
    exc = unwrap(exc)
    if isinstance(exc, ServiceError):
        return exc
    log.error("internal error", exc_info=exc)
    return ServiceError("internal error")


def status_of(err: ServiceError) -> tuple[int, str]:
    for cls, status, kind in ERROR_TABLE:
        if isinstance(err, cls):
            return status, kind
    return 500, "internal_error"  # unreachable: ServiceError closes the table


def gateway_error(status: int) -> ServiceError:
    """What the gateway (HAProxy) answers for its own 408/502/503/504, in the envelope (``serve.haproxy``)."""
    if status == 408:
        return InferenceTimeout("the request did not arrive in time", code="request_timeout")
    if status == 502:
        return ReplicaFailed("the replica handling this request failed before it answered; retry")
    if status == 503:
        return NoReplica("no replica can take this request now; retry shortly")
    return ReplicaTimeout("the replica did not answer within the server timeout")


def error_body(err: ServiceError, request_id: str | None) -> tuple[int, dict, dict[str, str]]:
    """Status, the OpenAI error envelope, and extra headers (``Retry-After`` on 503)."""
    status, kind = status_of(err)
    message = err.message if status != 500 else "internal error"
    body = {
        "error": {"message": message, "type": kind, "param": err.param, "code": err.code},
        "request_id": request_id,
    }
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = str(getattr(err, "retry_after_s", 1))
    return status, body, headers
