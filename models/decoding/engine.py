"""Iteration-level (continuous) batching of a causal LM across LoRA adapters, on one thread.

``DecodeEngine.step`` is one iteration: drop cancelled sequences; one prefill pass over the next
chunks of waiting prompts (left-padded rows, within the step's token budget less one token per
running sequence); then one decode pass over every running sequence (one new token each). Every
row goes through its own adapter's slot of the stacked LoRA matrices (``models.lora_slots``). A
sequence whose prompt is fully prefilled gets its first token from the prefill pass and its
second from the decode pass of the same step; finished sequences leave at once and their slots
are refilled. Prefill first: a new request's first token waits for at most the step in flight. So a request joins the running batch at the next step, a long prompt never stalls
the running streams for more than one chunk, and rows of different adapters share every pass.

The engine is synchronous and Ray-free: the serving layer (``serve.server.decoding``) calls
``step`` from one worker thread, passing new sequences and cancellations in and getting the text
deltas out. KV cache: ``models.decoding.kv_cache.SlotKVCache``, running sequences in slots
``0..running-1`` so a decode pass reads a view of the cache, never a gather.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable
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
        self.cache = SlotKVCache(max_running, context, scratch=step_tokens)
        self.running: list[GenSeq] = []  # slot i holds running[i]
        self.prefilling: list[GenSeq] = []  # slots after the running ones, in order
        self.waiting: collections.deque[GenSeq] = collections.deque()

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
    def step(self, cancel: Iterable[int] = (), early: Callable[[list[Delta]], None] | None = None) -> list[Delta]:
        """One iteration; returns its deltas. ``early`` gets the prefill pass's deltas (first
        tokens) as soon as that pass ends, before the decode pass runs."""
        out: list[Delta] = []
        cancel = set(cancel)
        if cancel:
            self._cancel(cancel, out)
        self._prefill(out)  # first: a waiting request's first token does not wait for a decode pass
        if early is not None and out:
            early(out)
            out = []
        if self.running:
            self._decode(out)
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
        ids = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long)
        logits = self._forward(0, rows, ids, [1] * len(rows))
        chosen = next_tokens(logits, [s.params for s in rows], [s.generator for s in rows])
        done = False
        for s, token in zip(rows, chosen):
            out.append(self._emit(s, token))
            done = done or s.finish is not None
        if done:
            self.running = [s for s in rows if s.finish is None]
            self._compact()

    def _prefill(self, out: list[Delta]) -> None:
        """The next chunk of every prompt in prefill, in one pass, within the step's budget."""
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_running:
            s = self.waiting.popleft()
            s.slot = len(self.running) + len(self.prefilling)
            self.prefilling.append(s)
        budget = max(self.step_tokens - len(self.running), 1)  # the decode pass takes one per row
        rows, qs = [], []
        for s in self.prefilling:  # in slot order: the rows are a contiguous run of slots
            q = min(budget, len(s.prompt) - s.cached)
            if q <= 0:
                break
            rows.append(s)
            qs.append(q)
            budget -= q
        if not rows:
            return
        width = max(qs)
        ids = torch.tensor([[0] * (width - q) + s.prompt[s.cached:s.cached + q] for s, q in zip(rows, qs)],
                           dtype=torch.long)
        logits = self._forward(rows[0].slot, rows, ids, qs)
        complete = [(i, s) for i, s in enumerate(rows) if s.cached == len(s.prompt)]
        if not complete:
            return
        chosen = next_tokens(logits[[i for i, _ in complete]], [s.params for _, s in complete],
                             [s.generator for _, s in complete])
        for (_, s), token in zip(complete, chosen):
            out.append(self._emit(s, token))
            self.prefilling.remove(s)
            if s.finish is None:
                self.running.append(s)
        self._compact()

    def _forward(self, first: int, rows: list[GenSeq], ids: torch.Tensor, qs: list[int]) -> torch.Tensor:
        """One pass over slots ``first ..`` (``ids`` left-padded); next-token logits per row."""
        mask, positions = self.cache.rows(first, [s.cached for s in rows], qs)
        with self.lora.rows([s.adapter for s in rows]):
            result = self.model(
                input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=self.cache,
                cache_position=positions[0], use_cache=True, logits_to_keep=1,
            )
        for s, q in zip(rows, qs):
            s.cached += q
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
        """Running sequences into slots ``0..``, prefilling ones right after them."""
        moves = []
        for want, s in enumerate(itertools.chain(self.running, self.prefilling)):
            if s.slot != want:
                if s.cached:
                    moves.append((s.slot, want, s.cached))
                s.slot = want
        if moves:
            self.cache.move(moves)
