"""``POST /v1/completions`` and ``POST /v1/chat/completions``: read, check, resolve, submit, and
answer as one JSON body or as server-sent events ending in ``data: [DONE]``.

Everything that can be refused is refused before the first byte of a stream (API key, body,
schema, the model string, the model's bounds, the context, a full queue: a 4xx or 503 in the
error envelope). Once streaming, a failure is sent as an ``error`` event followed by
``[DONE]``. A client that goes away ends the response's generator (the next write fails), which
closes the stream and cancels its sequences: they leave the batch at the next step. A
non-streamed request has the service's request deadline (408 after, its sequences cancelled).
"""

from __future__ import annotations

import asyncio
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from models.errors import InferenceTimeout, TaskNotSupported, TooManyInputs
from serve.errors import as_service_error, error_body, status_of
from serve.ingress.generation_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    choice_delta,
    chunk,
    completion_body,
    usage,
)
from serve.ingress.http_io import check_api_key, parse, read_json
from serve.ingress.responses import error_response, json_response
from serve.metrics import UNKNOWN_MODEL
from serve.server.decoding import Stream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


async def completions(core, request: Request, chat: bool) -> Response:
    route = "chat_completions" if chat else "completions"
    rid = core.request_id()
    start = time.perf_counter()
    model, adapter = UNKNOWN_MODEL, None
    try:
        check_api_key(request, core.keys)
        body = parse(ChatCompletionRequest if chat else CompletionRequest,
                     await read_json(request, core.settings.limits.max_body_bytes))
        resolved = await core.resolve(body.model)
        model = resolved.spec.id
        adapter = resolved.adapter.name if resolved.adapter is not None else None
        server = core.servers[(resolved.spec.id, resolved.variant)]
        if resolved.spec.task != "generate":
            raise TaskNotSupported(f"model {resolved.spec.id!r} serves {resolved.spec.task!r}; it does not "
                                   "generate text", param="model")
        if chat:
            prompts = [server.encode_chat(body.chat())]
        else:
            texts = body.prompts()
            if len(texts) > core.settings.limits.max_inputs:
                raise TooManyInputs(f"{len(texts)} prompts in one request; the limit is "
                                    f"{core.settings.limits.max_inputs}", param="prompt")
            prompts = [server.encode_prompt(p) for p in texts]
        ask = body.ask(resolved.spec.generation, len(prompts))
        timeout_s = core.settings.limits.request_timeout_s
        stream = await server.generate(prompts, ask, resolved.adapter, timeout_s=timeout_s)
    except Exception as exc:
        err = as_service_error(exc)
        _record(core, route, model, status_of(err)[0], start, err.code, adapter)
        return error_response(err, rid)
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        events = _events(core, stream, chat, rid, created, body.model, prompt_tokens, body.include_usage,
                         (route, model, start, adapter))
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        texts, reasons = await asyncio.wait_for(_collect(stream), timeout_s)
    except TimeoutError:
        stream.close()
        err = InferenceTimeout(f"generation took longer than {timeout_s:g} s; ask for fewer tokens or stream")
        _record(core, route, model, status_of(err)[0], start, err.code, adapter)
        return error_response(err, rid)
    except Exception as exc:
        stream.close()
        err = as_service_error(exc)
        _record(core, route, model, status_of(err)[0], start, err.code, adapter)
        return error_response(err, rid)
    use = usage(prompt_tokens, sum(len(s.tokens) for s in stream.seqs), sum(s.reused for s in stream.seqs))
    make = chat_body if chat else completion_body
    _record(core, route, model, 200, start, None, adapter)
    return json_response(200, make(rid, created, body.model, texts, reasons, use))


async def _collect(stream: Stream) -> tuple[list[str], list[str | None]]:
    index = {s.id: i for i, s in enumerate(stream.seqs)}
    texts = [""] * len(index)
    reasons: list[str | None] = [None] * len(index)
    try:
        async for d in stream:
            i = index[d.seq.id]
            texts[i] += d.text
            if d.finish is not None:
                reasons[i] = d.finish
    finally:
        stream.close()
    return texts, reasons


async def _events(core, stream: Stream, chat, rid, created, model, prompt_tokens, include_usage, rec):
    route, model_id, start, adapter = rec
    index = {s.id: i for i, s in enumerate(stream.seqs)}
    use = None if include_usage else False
    status, code = 200, None
    try:
        if chat:  # the role first, as OpenAI does
            first = [choice_delta(True, i, "", None, first=True) for i in range(len(index))]
            yield _sse(chunk(True, rid, created, model, first, use))
        async for d in stream:
            if not d.text and d.finish is None:
                continue
            choice = choice_delta(chat, index[d.seq.id], d.text, d.finish)
            yield _sse(chunk(chat, rid, created, model, [choice], use))
        if include_usage:
            total = usage(prompt_tokens, sum(len(s.tokens) for s in stream.seqs), sum(s.reused for s in stream.seqs))
            yield _sse(chunk(chat, rid, created, model, [], total))
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        status, code = 499, "client_closed"
        raise
    except Exception as exc:
        err = as_service_error(exc)
        status, code = status_of(err)[0], err.code
        _, payload, _ = error_body(err, rid)
        yield _sse(payload)
    finally:
        stream.close()
        _record(core, route, model_id, status, start, code, adapter)
    yield DONE


def _sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _record(core, route, model, status, start, code, adapter) -> None:
    if core.metrics is not None:
        latency_ms = (time.perf_counter() - start) * 1000
        asyncio.get_running_loop().call_soon(core.metrics.request, route, model, status, latency_ms, code, adapter)
