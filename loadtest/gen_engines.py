"""The four ways of serving generation that ``loadtest/bench_generation.py`` compares, in process,
each behind the same tiny surface (``submit`` a ``Req``; a worker thread fills in its times):

- ``PerRequest``: one ``model.generate`` per request, one at a time (the tutorial recipe), with
  a streamer so the first token's time is known; adapters: peft's ``set_adapter`` per request.
- ``StaticBatch``: whatever is queued when the model is free runs as one left-padded
  ``model.generate`` batch until its longest row ends; mixed adapters through peft's
  ``adapter_names``; newcomers wait for the whole batch.
- ``Continuous``: the service's ``DecodeEngine`` (``models.decoding``): rows join at the next step,
  adapters in stacked slots.
- ``HFContinuous``: transformers' own continuous batching (``init_continuous_batching``); it has
  no per-request adapter, so it runs one adapter (merged into the weights) only.

A single-adapter run gives ``PerRequest``, ``StaticBatch`` and ``HFContinuous`` the adapter
merged into the weights (what a careful user serving one adapter does); ``Continuous`` keeps it in
a slot, as the service does.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Req:
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    t_submit: float = 0.0
    t_first: float | None = None
    t_end: float | None = None
    tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def token(self) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.tokens += 1

    def finish(self) -> None:
        if not self.done.is_set():
            self.t_end = time.perf_counter()
            self.done.set()


class _Worker:
    name = ""

    def __init__(self):
        self.q: queue.Queue[Req | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, req: Req) -> None:
        self.q.put(req)

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=60)


class _RowStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt first, then one token per row
    per step; rows stop counting at end of text or their own ``max_tokens``."""

    def __init__(self, reqs: list[Req], eos: int):
        self.reqs, self.eos, self.prompt_seen = reqs, eos, False
        self.open = [True] * len(reqs)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, t in enumerate(value.reshape(-1).tolist()):
            r = self.reqs[i]
            if not self.open[i]:
                continue
            if t == self.eos:
                self.open[i] = False
                r.finish()
                continue
            r.token()
            if r.tokens >= r.max_tokens:
                self.open[i] = False
                r.finish()

    def end(self) -> None:
        for r in self.reqs:
            r.finish()


class PerRequest(_Worker):
    name = "one generate per request"

    def __init__(self, model, eos: int, pad: int, adapters: bool):
        super().__init__()
        self.model, self.eos, self.pad, self.adapters = model, eos, pad, adapters

    @torch.inference_mode()
    def _run(self) -> None:
        while (r := self.q.get()) is not None:
            if self.adapters:
                self.model.set_adapter(r.adapter)
            ids = torch.tensor([r.prompt])
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                                do_sample=False, eos_token_id=self.eos, pad_token_id=self.pad,
                                streamer=_RowStreamer([r], self.eos))


class StaticBatch(_Worker):
    name = "static batches"

    def __init__(self, model, eos: int, pad: int, adapters: bool, max_batch: int = 32):
        super().__init__()
        self.model, self.eos, self.pad, self.adapters, self.max_batch = model, eos, pad, adapters, max_batch

    @torch.inference_mode()
    def _run(self) -> None:
        while (first := self.q.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    r = self.q.get_nowait()
                except queue.Empty:
                    break
                if r is None:
                    self.q.put(None)
                    break
                batch.append(r)
            width = max(len(r.prompt) for r in batch)
            ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in batch])
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
            kw = {"adapter_names": [r.adapter for r in batch]} if self.adapters else {}
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch),
                                do_sample=False, eos_token_id=self.eos, pad_token_id=self.pad,
                                streamer=_RowStreamer(batch, self.eos), **kw)


class Continuous(_Worker):
    name = "continuous batching (ours)"

    def __init__(self, backend):
        super().__init__()
        self.engine = backend.engine

    @torch.inference_mode()
    def _run(self) -> None:
        from models import GenSeq, SamplingParams

        owner: dict[int, Req] = {}
        stopping = False

        def intake(block: bool = False) -> None:  # as the service's decode loop: also between passes
            nonlocal stopping
            new = []
            while True:
                try:
                    r = self.q.get(block=block)
                except queue.Empty:
                    break
                block = False
                if r is None:
                    stopping = True
                    continue
                s = GenSeq(r.prompt, SamplingParams(r.max_tokens, 0.0), r.adapter)
                owner[s.id] = r
                new.append(s)
            if new:
                self.engine.admit(new)

        while not (stopping and not self.engine.busy):
            if not self.engine.busy and not stopping:
                intake(block=True)

            def deliver(deltas):
                for d in deltas:
                    r = owner[d.seq.id]
                    if d.token is not None and d.finish != "stop":
                        r.token()
                    if d.finish is not None:
                        r.finish()
                        del owner[d.seq.id]

            deliver(self.engine.step(early=deliver, intake=intake))  # first tokens as the service sends them


class HFContinuous:
    name = "transformers continuous batching"

    def __init__(self, model, eos: int, pad: int, max_tokens: int):
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                               use_cuda_graph=False)
        self.manager = model.init_continuous_batching(generation_config=cfg, streaming=True)
        self.eos = eos
        self.owner: dict[str, Req] = {}
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._dispatch, daemon=True)

    def start(self):
        self.manager.start()
        self.thread.start()
        return self

    def submit(self, req: Req) -> None:
        with self.lock:
            rid = self.manager.add_request(req.prompt, max_new_tokens=req.max_tokens)
            self.owner[rid] = req

    def _dispatch(self) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        while self.running:
            out = self.manager.get_result(timeout=0.05)
            if out is None:
                continue
            with self.lock:
                r = self.owner.get(out.request_id)
            if r is None:
                continue
            tokens = [t for t in out.generated_tokens if t != self.eos]
            while r.tokens < len(tokens):
                r.token()
            if out.status in (RequestStatus.FINISHED, RequestStatus.FAILED):
                r.finish()

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=10)
        self.manager.stop(block=True, timeout=30)


def hf_continuous_problem(model, eos: int, pad: int, prompts: list[list[int]], max_tokens: int = 24) -> str | None:
    """Why transformers' continuous batching cannot be a baseline here, or None when it can: it
    must run on this CPU and give ``model.generate``'s greedy tokens. In transformers 4.57 its
    paged cache sizes itself from the accelerator's memory, which fails on a CPU-only machine;
    patched to read the host's memory instead (``psutil``), it must still match generate."""
    import psutil
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching import cache

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                           use_cuda_graph=False, num_blocks=512, max_batch_tokens=256, block_size=32)
    problems = []
    out = model.generate_batch(prompts, generation_config=cfg, progress_bar=False)
    if not out:
        problems.append("as installed it fails on CPU (its paged cache asks the accelerator for free memory)")
        cache.PagedAttentionMemoryHandler.get_available_memory = staticmethod(
            lambda max_memory_percent=1.0: int(psutil.virtual_memory().available * max_memory_percent))
        out = model.generate_batch(prompts, generation_config=cfg, progress_bar=False)
        if not out:
            return "; ".join(problems + ["it fails with host memory too"])
        problems.append("patched to size its cache from host memory, it runs")
    got = [list(o.generated_tokens) for o in sorted(out.values(), key=lambda o: int(o.request_id.split("_")[-1]))]
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)[0, len(prompt):].tolist()
        if tokens != ref:
            return "; ".join(problems + [f"but its greedy tokens differ from model.generate's ({tokens[:8]} vs "
                                         f"{ref[:8]}), so its speed would not measure the same work"])
    return None
