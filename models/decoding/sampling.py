"""Choosing the next token of each row: greedy, or temperature and nucleus (top-p) sampling with
a generator per sequence, so a request with a ``seed`` gets the same text whatever shares its
batch. Greedy is ``argmax`` of the raw logits, as ``model.generate(do_sample=False)`` does."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence asks for (bounds are checked by the caller, from the model's spec)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: generate up to max_tokens whatever comes

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def generator_for(params: SamplingParams) -> torch.Generator | None:
    """A private random stream for a sampled sequence (seeded when the request says so)."""
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of ``logits: [rows, vocab]``."""
    if all(p.greedy for p in params):
        return logits.argmax(-1).tolist()
    out = []
    for row, p, g in zip(logits, params, generators):
        out.append(int(row.argmax()) if p.greedy else _sample(row, p, g))
    return out


def _sample(logits: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)  # [vocab]
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        keep = cum - sorted_p < p.top_p  # the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p, 1, generator=g)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=g))
