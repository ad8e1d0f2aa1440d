"""Reading request bodies safely: auth first, then content type, then a bounded body read.

The size limit is enforced from ``Content-Length`` before any byte of the body is read, and
again while streaming (chunked uploads), so an oversized body is never held in memory whole.
JSON is parsed strictly by orjson: ``NaN``, ``Infinity``, numbers that overflow a double and
lone surrogates are invalid JSON, answered with 400 ``invalid_json``.
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from models.errors import Forbidden, InvalidRequest, PayloadTooLarge, Unauthorized, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def check_api_key(request: Request, keys: frozenset[str]) -> None:
    if keys and _bearer(request) not in keys:
        raise Unauthorized("missing or invalid API key (send `Authorization: Bearer <key>`)")


def check_admin_key(request: Request, admin_keys: frozenset[str], api_keys: frozenset[str]) -> None:
    """Admin routes: with admin keys configured, only they pass and an inference key gets
    403; without admin keys, the inference key rule applies (local development)."""
    if not admin_keys:
        check_api_key(request, api_keys)
        return
    token = _bearer(request)
    if token in admin_keys:
        return
    if token is not None and token in api_keys:
        raise Forbidden("this key may call inference routes only; adapter routes need an admin key")
    raise Unauthorized("missing or invalid admin key (send `Authorization: Bearer <admin key>`)")


async def read_json(request: Request, max_bytes: int) -> object:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"content type {ctype or '(none)'!r} is not supported; send application/json"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest(f"bad Content-Length {declared!r}") from None
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is {size} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def parse(schema: type[M], data: object) -> M:
    """Validate with pydantic; the first error becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        hint = getattr(schema, "input_shapes", None)
        if first["loc"] and first["loc"][0] == "input" and hint and first["type"] != "value_error":
            msg = f"invalid `input`: expected {hint}"
        elif first["type"] == "missing":
            msg = f"missing required field `{loc}`"
        else:
            msg = f"invalid `{loc}`: {first['msg']}"
        raise InvalidRequest(msg, param=loc.split(".")[0] if loc else None) from None
