"""Responses of the ingress: JSON bodies written by orjson, the error envelope, request ids."""

from __future__ import annotations

import itertools
import os

import orjson
from starlette.responses import Response

from models.errors import ServiceError
from serve.errors import error_body

JSON = "application/json"
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """Unique per replica process and cheap (uuid4 costs a syscall per request)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def serve_request_id() -> str:
    """The id Serve already gave this request (and echoes as ``x-request-id``)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or new_request_id()


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON
    )


def error_response(err: ServiceError, request_id: str | None = None) -> Response:
    status, body, headers = error_body(err, request_id or serve_request_id())
    return json_response(status, body, headers)
