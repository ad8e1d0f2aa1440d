"""Zipf popularity: the share of traffic that goes to each of ``n`` items ranked by popularity.

``zipf_weights(n, s)[k - 1]`` is the probability that a request goes to the item of rank ``k``
(rank 1 the most popular): proportional to ``1 / k**s``, normalized to sum to 1. ``s = 0`` is
uniform; the benchmarks use ``s = 1.1`` (a few adapters get most requests, a long tail a little).
Callers that draw by bisection build the cumulative sums themselves (``itertools.accumulate``).
"""

from __future__ import annotations


def zipf_weights(n: int, s: float) -> list[float]:
    """Probabilities of ranks 1..n under Zipf(s); they sum to 1 (an empty list for n = 0)."""
    if n < 0 or s < 0:
        raise ValueError(f"need n >= 0 and s >= 0, got n={n}, s={s}")
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]
