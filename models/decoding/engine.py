"""Iteration-level (continuous) batching of a causal LM across LoRA adapters, on one thread.

``DecodeEngine.step`` is one iteration: drop cancelled sequences, one decode pass over every
running sequence (one new token each, each row through its own adapter's slot of the stacked
LoRA matrices, ``models.lora_slots``), then prefill waiting prompts in chunks with what is left
of the step's token budget. A sequence whose prompt is fully prefilled gets its first token in
the same step and decodes from the next one; finished sequences leave at once and their slots
are refilled. So a request joins the running batch at the next step, a long prompt never stalls
the running streams for more than one chunk, and rows of different adapters share every pass.

The engine is synchronous and Ray-free: the serving layer (``serve.server.decoding``) calls
``step`` from one worker thread, passing new sequences and cancellations in and getting the text
deltas out. KV cache: ``models.decoding.kv_cache.SlotKVCache``, running sequences in slots
``0..running-1`` so a decode pass reads a view of the cache, never a gather.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from models.decoding.kv_cache import SlotKVCache
from models.decoding.sampling import SamplingParams, generator_for, next_tokens
from models.decoding.text import IncrementalText
from models.errors import Overloaded

_ids = itertools.count(1)


@dataclass(eq=False)
class GenSeq:
    """One sequence to generate (a request with ``n`` choices makes ``n`` of them)."""

    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # a loaded adapter's key, None: the bare base
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # generated so far
    cached: int = 0  # positions in the KV cache
    slot: int = -1
    finish: str | None = None  # stop | length | abort
    text: IncrementalText | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Delta:
    """What one step produced for one sequence: a token (or none, when it was cancelled before
    producing one), the text it made showable, and the finish reason when it ended."""

    seq: GenSeq
    text: str
    token: int | None
    finish: str | None


class DecodeEngine:
    def __init__(
        self, model, tokenizer, lora, *, context: int, max_running: int, max_waiting: int,
        step_tokens: int, eos: Iterable[int],
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora  # models.lora_slots.LoraEncoder over ``model``
        self.context = context
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.step_tokens = step_tokens  # decode rows + prefill tokens per step (at least one chunk)
        self.eos = frozenset(eos)
        self.cache = SlotKVCache(max_running, context)
        self.running: list[GenSeq] = []  # slot i holds running[i]
        self.prefilling: list[GenSeq] = []  # slots after the running ones, in order
        self.waiting: collections.deque[GenSeq] = collections.deque()
        self.steps = 0

    # -- admission (any thread may call ``admit`` between steps; the server serializes) ----------
    def admit(self, seqs: list[GenSeq]) -> None:
        """Queue new sequences; ``Overloaded`` (503) when more than ``max_running`` slots plus
        ``max_waiting`` places would be taken."""
        if self.load() + len(seqs) > self.max_running + self.max_waiting:
            raise Overloaded(
                f"generation is at capacity ({len(self.running)} running, {len(self.waiting)} "
                f"waiting); retry shortly"
            )
        for s in seqs:
            if len(s.prompt) + s.params.max_tokens > self.context:
                raise ValueError("prompt plus max_tokens exceeds the context")  # checked earlier
            s.text = IncrementalText(self.tokenizer, s.params.stop)
            s.generator = generator_for(s.params)
        self.waiting.extend(seqs)

    def load(self) -> int:
        """Sequences admitted and not finished: running, prefilling and waiting."""
        return len(self.running) + len(self.prefilling) + len(self.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def kv_usage(self) -> float:
        """Share of the KV cache's positions holding tokens."""
        used = sum(s.cached for s in itertools.chain(self.running, self.prefilling))
        return used / (self.max_running * self.context)

    # -- one iteration ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, cancel: Iterable[int] = ()) -> list[Delta]:
        out: list[Delta] = []
        cancel = set(cancel)
        if cancel:
            self._cancel(cancel, out)
        if self.running:
            self._decode(out)
        self._prefill(out)
        self.steps += 1
        return out

    def _cancel(self, ids: set[int], out: list[Delta]) -> None:
        for group in (self.running, self.prefilling):
            for s in [s for s in group if s.id in ids]:
                group.remove(s)
                s.finish = "abort"
                out.append(Delta(s, "", None, "abort"))
        for s in [s for s in self.waiting if s.id in ids]:
            self.waiting.remove(s)
            s.finish = "abort"
            out.append(Delta(s, "", None, "abort"))
        self._compact()

    def _decode(self, out: list[Delta]) -> None:
        rows = self.running
        mask = self.cache.decode([s.cached for s in rows])
        ids = torch.tensor([s.tokens[-1] for s in rows], dtype=torch.long)[:, None]
        positions = torch.tensor([s.cached for s in rows], dtype=torch.long)[:, None]
        logits = self._forward(ids, positions, mask, [s.adapter for s in rows])  # [rows, vocab]
        for s in rows:
            s.cached += 1
        chosen = next_tokens(logits, [s.params for s in rows], [s.generator for s in rows])
        done = False
        for s, token in zip(rows, chosen):
            out.append(self._emit(s, token))
            done = done or s.finish is not None
        if done:
            self.running = [s for s in rows if s.finish is None]
            self._compact()

    def _prefill(self, out: list[Delta]) -> None:
        budget = max(self.step_tokens - len(self.running), 1)
        while budget > 0:
            if not self.prefilling:
                if not self.waiting or len(self.running) + len(self.prefilling) >= self.max_running:
                    return
                s = self.waiting.popleft()
                s.slot = len(self.running) + len(self.prefilling)
                self.prefilling.append(s)
            s = self.prefilling[0]
            q = min(budget, len(s.prompt) - s.cached)
            budget -= q
            mask = self.cache.prefill(s.slot, s.cached, q)
            ids = torch.tensor([s.prompt[s.cached:s.cached + q]], dtype=torch.long)
            positions = torch.arange(s.cached, s.cached + q)[None]
            logits = self._forward(ids, positions, mask, [s.adapter])
            s.cached += q
            if s.cached < len(s.prompt):
                continue  # the rest of the prompt in the next step
            self.prefilling.pop(0)
            token = next_tokens(logits, [s.params], [s.generator])[0]
            out.append(self._emit(s, token))
            if s.finish is None:
                self.running.append(s)  # its slot is len(running) already
            else:
                self._compact()

    def _forward(self, ids, positions, mask, adapters) -> torch.Tensor:
        with self.lora.rows(adapters):
            result = self.model(
                input_ids=ids, position_ids=positions, attention_mask=mask,
                past_key_values=self.cache, cache_position=positions[0], use_cache=True,
                logits_to_keep=1,
            )
        return result.logits[:, -1]  # [rows, vocab]

    def _emit(self, s: GenSeq, token: int) -> Delta:
        finish = None
        text = ""
        if token in self.eos and not s.params.ignore_eos:
            finish = "stop"
        else:
            s.tokens.append(token)
            text = s.text.add(token)
            if s.text.stopped:
                finish = "stop"
            elif len(s.tokens) >= s.params.max_tokens or len(s.prompt) + len(s.tokens) >= self.context:
                finish = "length"
        if finish is not None:
            if finish != "stop" or not s.text.stopped:
                text += s.text.flush()
            s.finish = finish
        return Delta(s, text, token, finish)

    def _compact(self) -> None:
        """Running sequences back into slots ``0..``, prefilling ones right after them."""
        for want, s in enumerate(itertools.chain(self.running, self.prefilling)):
            if s.slot != want:
                if s.cached:
                    self.cache.move(s.slot, want, s.cached)
                s.slot = want
