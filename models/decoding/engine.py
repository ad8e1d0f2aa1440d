"""Iteration-level (continuous) batching of a causal LM across LoRA adapters, on one thread.

``DecodeEngine.step`` is one iteration: drop cancelled sequences; one prefill pass over the next
chunks of waiting prompts (left-padded rows, at most ``step_tokens`` tokens); then one decode
pass over every running sequence (one new token each). Every row goes through its own adapter's
slot of the stacked LoRA matrices (``models.lora_slots``). A sequence whose prompt is fully
prefilled gets its first token from the prefill pass and its second from the decode pass of the
same step; finished sequences leave at once and their slots
are refilled. Prefill first, and arrivals taken between passes too (``intake``): a request that
comes while a prefill pass runs gets its own prefill pass right after it, before the decode pass
(at most ``EXTRA_PREFILLS`` such passes per step, so running streams keep flowing); one that comes
while a decode pass runs waits for that pass only. So a new request's first token waits for at
most the pass in flight plus its own prefill pass, a long prompt never stalls the running streams
for more than one chunk, and rows of different adapters share every pass.

The engine is synchronous and Ray-free: the serving layer (``serve.server.decoding``) calls
``step`` from one worker thread, passing new sequences and cancellations in and getting the text
deltas out. KV cache: ``models.decoding.kv_cache.SlotKVCache``, running sequences in slots
``0..running-1`` so a decode pass reads a view of the cache, never a gather. A sequence taking a
slot first gets the KV of its prompt's longest cached prefix (``models.decoding.prefix_cache``);
a prompt fully prefilled leaves its whole blocks there for the next ones.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from models.decoding.kv_cache import SlotKVCache
from models.decoding.prefix_cache import PrefixCache
from models.decoding.sampling import SamplingParams, generator_for, next_tokens
from models.decoding.text import IncrementalText
from models.errors import Overloaded

_ids = itertools.count(1)
EXTRA_PREFILLS = 2  # prefill passes per step for arrivals taken after the first one


@dataclass(eq=False)
class GenSeq:
    """One sequence to generate (a request with ``n`` choices makes ``n`` of them)."""

    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # a loaded adapter's key, None: the bare base
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # generated so far
    cached: int = 0  # positions in the KV cache
    reused: int = 0  # prompt tokens whose KV came from the prefix cache
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
        step_tokens: int, eos: Iterable[int], prefix_cache_bytes: int = 0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora  # models.lora_slots.LoraEncoder over ``model``
        self.context = context
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.step_tokens = step_tokens  # prompt tokens per prefill pass (the longest chunk)
        self.eos = frozenset(eos)
        self.cache = SlotKVCache(max_running, context, scratch=step_tokens)
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
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
    def step(self, cancel: Iterable[int] = (), early: Callable[[list[Delta]], None] | None = None,
             intake: Callable[[], None] | None = None) -> list[Delta]:
        """One iteration; returns its deltas. ``early`` gets each prefill pass's deltas (first
        tokens) as soon as that pass ends, before the decode pass runs. ``intake`` (the server's)
        admits the sequences that arrived since it was last called; it is called before the first
        prefill pass and after each one."""
        out: list[Delta] = []
        cancel = set(cancel)
        if cancel:
            self._cancel(cancel, out)
        for extra in range(EXTRA_PREFILLS + 1):
            if intake is not None:
                intake()
            if extra and not self._first_tokens_due():
                break  # a long prompt's next chunk waits for the next step: the streams go first
            if not self._prefill(out):  # first: a new request's first token waits for no decode pass
                break
            if early is not None and out:
                early(out)
                out = []
        if self.running:
            self._decode(out)
        return out

    def _first_tokens_due(self) -> bool:
        """Would one more prefill pass give some sequence its first token? (A prompt in
        prefill whose rest fits one pass, or a waiting one that can take a slot now.)"""
        return any(len(s.prompt) - s.cached <= self.step_tokens for s in self.prefilling) or bool(
            self.waiting and len(self.running) + len(self.prefilling) < self.max_running
            and len(self.waiting[0].prompt) <= self.step_tokens)

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

    def _prefill(self, out: list[Delta]) -> bool:
        """The next chunk of every prompt in prefill, in one pass, within the step's budget;
        False when there was nothing to prefill. (Sequences enter their next list before they
        leave the last, so ``load`` read from another thread never counts one short.)"""
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_running:
            s = self.waiting[0]
            s.slot = len(self.running) + len(self.prefilling)
            if self.prefix is not None and not s.cached:
                s.cached, kv = self.prefix.match(self._tag(s.adapter), s.prompt)
                if kv is not None:
                    self.cache.write(s.slot, 0, kv)
                s.reused = s.cached
            self.prefilling.append(s)
            self.waiting.popleft()
        budget = self.step_tokens  # per pass: the decode pass is a pass of its own
        rows, qs = [], []
        for s in self.prefilling:  # in slot order: the rows are a contiguous run of slots
            q = min(budget, len(s.prompt) - s.cached)
            if q <= 0:
                break
            rows.append(s)
            qs.append(q)
            budget -= q
        if not rows:
            return False
        width = max(qs)
        ids = torch.tensor([[0] * (width - q) + s.prompt[s.cached:s.cached + q] for s, q in zip(rows, qs)],
                           dtype=torch.long)
        logits = self._forward(rows[0].slot, rows, ids, qs)
        complete = [(i, s) for i, s in enumerate(rows) if s.cached == len(s.prompt)]
        if not complete:
            return True
        chosen = next_tokens(logits[[i for i, _ in complete]], [s.params for _, s in complete],
                             [s.generator for _, s in complete])
        for (_, s), token in zip(complete, chosen):
            if self.prefix is not None:
                self.prefix.store(self._tag(s.adapter), s.prompt, lambda i, n, slot=s.slot: self.cache.read(slot, i, n))
            out.append(self._emit(s, token))
            if s.finish is None:
                self.running.append(s)
            self.prefilling.remove(s)
        self._compact()
        return True

    def _tag(self, adapter: str | None):
        """Whose KV a prefix is: the adapter as loaded now (a reload gets a new serial)."""
        return None if adapter is None else (adapter, self.lora.serial.get(adapter))

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
        """Running sequences into slots ``0..R-1``, prefilling ones into ``R..R+P-1``, moving as
        few as possible: a sequence already inside its range stays, one outside takes a free slot
        of it (a finished sequence's hole is refilled by one from the end, never by shifting every
        sequence after it: each move copies a slot's cache, in every layer)."""
        moves = []
        start = 0
        for group in (self.running, self.prefilling):
            end = start + len(group)
            held = {s.slot for s in group if start <= s.slot < end}
            free = iter(sorted(set(range(start, end)) - held))
            for s in group:
                if not start <= s.slot < end:
                    want = next(free)
                    if s.cached:
                        moves.append((s.slot, want, s.cached))
                    s.slot = want
            group.sort(key=lambda s: s.slot)
            start = end
        if moves:
            self.cache.move(moves)
