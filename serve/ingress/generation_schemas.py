"""Wire schemas of ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI's shapes) and the
encoders of their responses and stream chunks.

Types are strict and ranges are OpenAI's (``temperature`` 0..2, ``top_p`` in (0, 1]); the
limits that depend on the model (``max_tokens``, ``n``, stop strings, the context) are checked
against its ``generation`` settings once the ``model`` string is resolved. Parameters this
server does not implement are refused with 400 when set to anything but their neutral value,
never silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from models.errors import InvalidRequest
from models.spec import GenerationSpec
from serve.server.generation import Ask

ROLES = ("system", "user", "assistant")
TokenIds = list[StrictInt]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Generate(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(description="BASE, ADAPTER or BASE:ADAPTER.")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: StrictFloat | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0: greedy.")
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1, description="Choices per prompt.")
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: do not stop at the end-of-text token.")

    # name -> neutral values: anything else is refused (not implemented here)
    unsupported: ClassVar[dict[str, tuple]] = {
        "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
        "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
        "response_format": (None, {"type": "text"}),
    }

    def ask(self, g: GenerationSpec, prompts: int) -> Ask:
        """The request's generation parameters, checked against the model's bounds."""
        for name, neutral in self.unsupported.items():
            value = (self.model_extra or {}).get(name)
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise InvalidRequest(f"`{name}` is not supported by this server", param=name)
        max_tokens = self.max_tokens
        if max_tokens is not None and max_tokens > g.max_tokens:
            raise InvalidRequest(f"max_tokens {max_tokens} is over this model's limit of {g.max_tokens}",
                                 param="max_tokens")
        if self.n > g.max_n:
            raise InvalidRequest(f"n {self.n} is over this model's limit of {g.max_n}", param="n")
        if prompts * self.n > g.max_running:
            raise InvalidRequest(f"{prompts} prompts x n {self.n} asks for {prompts * self.n} sequences; "
                                 f"one request may run at most {g.max_running}", param="n")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > g.max_stop:
            raise InvalidRequest(f"{len(stop)} stop strings; the limit is {g.max_stop}", param="stop")
        for s in stop:
            if not 0 < len(s) <= g.max_stop_chars:
                raise InvalidRequest(f"each stop string must have 1 to {g.max_stop_chars} characters",
                                     param="stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        top_p = 1.0 if self.top_p is None else float(self.top_p)
        return Ask(max_tokens, temperature, top_p, self.n, stop, self.seed, self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generate):
    input_shapes: ClassVar[str] = "a string, a list of strings, a token-id array or a list of token-id arrays"
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequest("prompt must not be an empty list", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Generate):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens.")

    def chat(self) -> list[dict]:
        if not self.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}",
                                     param="messages")
            if m.content is None:
                raise InvalidRequest(f"messages[{i}] has no content", param="messages")
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            out.append({"role": m.role, "content": text})
        if out[-1]["role"] == "assistant":
            raise InvalidRequest("the last message must not be the assistant's (continuing an answer is not "
                                 "supported)", param="messages")
        return out

    def ask(self, g: GenerationSpec, prompts: int) -> Ask:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest("max_tokens and max_completion_tokens differ", param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        return super().ask(g, prompts)


# -- responses --------------------------------------------------------------------------------
def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage object; ``cached``: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_body(rid: str, created: int, model: str, texts: list[str], reasons: list, use: dict) -> dict:
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chat_body(rid: str, created: int, model: str, texts: list[str], reasons: list, use: dict) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chunk(chat: bool, rid: str, created: int, model: str, choices: list[dict], use: Any = False) -> dict:
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": choices}
    if use is not False:
        body["usage"] = use
    return body


def choice_delta(chat: bool, index: int, text: str, finish: str | None, first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
