"""An autoscaling policy that also reacts to adapter pressure (Ray Serve 2.60's custom policies).

Ray's default policy sizes a deployment by in-flight requests per replica. With LoRA adapters
that misses a second kind of pressure: a replica whose adapter cache keeps loading and evicting
(more hot adapters than its slots) is slow without being busy. Every replica reports its
adapter loads per second (``record_autoscaling_stats`` on the Router and the ModelServer
deployments); this policy takes Ray's queue-length answer and, when the replicas' mean load
rate stays above ``max_loads_per_s``, asks for one replica more, so the adapters spread over
more caches (Serve routes each adapter to the replicas that hold it). Ray applies the
deployment's bounds and up/down-scale delays to whatever the policy returns.

Use it in a deployment's ``autoscaling_config``::

    policy:
      policy_function: serve.autoscaling:AdapterPressurePolicy
      policy_kwargs: {max_loads_per_s: 2.0}
"""

from __future__ import annotations

import time
from typing import Any

ADAPTER_LOADS_PER_S = "adapter_loads_per_s"


class LoadRate:
    """Adapter loads per second since the previous call (one per replica)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._last: tuple[float, int] | None = None

    def __call__(self, loads: int) -> float:
        now = self.clock()
        last, self._last = self._last, (now, loads)
        if last is None or now <= last[0]:
            return 0.0
        return max(0, loads - last[1]) / (now - last[0])


class AdapterPressurePolicy:
    """Ray's queue-length policy, plus one replica while adapter loads stay above a rate."""

    def __init__(self, max_loads_per_s: float = 2.0):
        self.max_loads_per_s = max_loads_per_s

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        n = ctx.current_num_replicas
        if n == 0:
            return ctx.target_num_replicas, {}
        desired = n * ctx.total_num_requests / (ctx.config.get_target_ongoing_requests() * n)
        rates = (ctx.aggregated_metrics or {}).get(ADAPTER_LOADS_PER_S) or {}
        pressure = sum(rates.values()) / len(rates) if rates else 0.0
        if pressure > self.max_loads_per_s:
            desired = max(desired, n + 1)
        return desired, {"adapter_loads_per_s": round(pressure, 3)}
