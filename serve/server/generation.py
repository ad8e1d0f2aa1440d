"""The ModelServer role for a generative base: prompts in, streams of text deltas out.

``GenerativeServer`` is a ``ModelServer`` (same variant lifecycle, same adapter LRU, registry
sync and re-validation of adapter files) whose batcher is a ``DecodeLoop`` instead of the
encoders' ``Batcher``: sequences join the running batch at the next step. An adapter is held
resident from the request's admission until its last sequence finished or was cancelled.
Prompts are tokenized here (the chat template included), bounds checked against the model's
``generation`` settings and its context, then the sequences are submitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from models.adapters.identity import AdapterRef
from models.decoding.engine import GenSeq
from models.decoding.sampling import SamplingParams
from models.errors import InferenceTimeout, InvalidRequest, TaskNotSupported
from serve.server.decoding import DecodeLoop, Stream
from serve.server.local import ModelServer, _within


@dataclass(frozen=True)
class Ask:
    """What a request asks of generation, as the ingress parsed it (``max_tokens`` None: the
    model's default, cut to the context)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool = False


class GenerativeServer(ModelServer):
    def load(self) -> GenerativeServer:
        super().load()
        backend = self.backend
        self.decoder = DecodeLoop(backend.engine, self._observer, name=f"{self.spec.id}-decode")
        return self

    async def generate(
        self, prompts: Sequence[list[int]], ask: Ask, adapter: AdapterRef | None = None,
        timeout_s: float = 30.0,
    ) -> Stream:
        """Submit ``n`` sequences per prompt; the stream's deltas name their ``GenSeq``, in
        ``stream.seqs`` order (prompt-major). The adapter is released when the stream ends."""
        self._check_task("generate", adapter)
        b = self._ready()
        g = self.spec.generation
        params = []
        for i, prompt in enumerate(prompts):
            room = b.context - len(prompt)
            if room < 1 or (ask.max_tokens is not None and ask.max_tokens > room):
                asked = len(prompt) + (ask.max_tokens or 1)
                raise InvalidRequest(
                    f"this model's context is {b.context} tokens; prompt {i} has {len(prompt)} and "
                    f"max_tokens asks for {ask.max_tokens or 'at least 1'} more ({asked} in all)",
                    param="max_tokens" if ask.max_tokens and room >= 1 else "prompt",
                    code="context_length_exceeded",
                )
            limit = ask.max_tokens if ask.max_tokens is not None else min(g.default_max_tokens, room)
            for j in range(ask.n):
                seed = None if ask.seed is None else ask.seed + j
                params.append(SamplingParams(limit, ask.temperature, ask.top_p, seed, ask.stop, ask.ignore_eos))
        key = None
        if adapter is not None:
            try:
                key = await _within(self.adapters.acquire(adapter), timeout_s)
            except TimeoutError:
                raise InferenceTimeout(f"loading adapter {adapter.name!r} took longer than {timeout_s:g} s") from None
        seqs = [GenSeq(list(prompts[k // ask.n]), p, key) for k, p in enumerate(params)]
        try:
            stream = self.decoder.submit(seqs)
        except BaseException:
            if key is not None:
                self.adapters.release(key)
            raise
        stream.on_end = lambda: self._ended(stream, key)
        return stream

    def _ended(self, stream: Stream, key: str | None) -> None:
        if key is not None:
            self.adapters.release(key)
        tokens = sum(len(s.tokens) for s in stream.seqs)
        prompt = sum(len(s.prompt) for s in stream.seqs)
        ttft = tpot = None
        if stream.first_token is not None:
            ttft = stream.first_token - stream.started
            after = max(len(s.tokens) for s in stream.seqs) - 1
            if after > 0:
                tpot = (stream.last_token - stream.first_token) / after
        reasons = [s.finish or "abort" for s in stream.seqs]
        cached = sum(s.reused for s in stream.seqs)
        self._observer.generation_done(prompt, tokens, ttft, tpot, reasons, cached)

    def encode_prompt(self, prompt) -> list[int]:
        return self._ready().encode_prompt(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._ready().encode_chat(messages)

    async def embed(self, *args, **kw):
        raise TaskNotSupported(f"model {self.spec.id!r} generates text; it has no embeddings", param="model")

    async def classify(self, *args, **kw):
        raise TaskNotSupported(f"model {self.spec.id!r} generates text; it does not classify", param="model")

    async def health(self) -> None:
        """Busy: the steps keep coming (a stuck one fails ``alive``). Idle: one token of real
        generation through the decode loop (a probe never queues behind real work)."""
        b = self._ready()
        if b.engine.busy:
            if not self.alive():
                raise RuntimeError("a generation step has run for too long")
            return
        stream = self.decoder.submit([GenSeq(b.encode_prompt("Once"), SamplingParams(1, 0.0))])
        try:
            async for _ in stream:
                pass
        finally:
            stream.close()

    def alive(self) -> bool:
        decoder = getattr(self, "decoder", None)
        ok = decoder is None or decoder.alive(self.spec.batching.stuck_batch_s)
        return (self.backend is not None or self.lifecycle.failed) and ok

    def close(self) -> None:
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            decoder.close()
        super().close()
