"""Free ports: the one place that decides whether a port can be used and picks ports for a run.

A port counts as free when nothing accepts connections on it *and* we can bind it ourselves
(both checks: Ray's and HAProxy's listeners use SO_REUSEPORT, so a bind alone can succeed next
to a live server). Benchmarks pick their ports in a band of their own, below Linux's ephemeral
range (32768+, where Ray's processes bind random ports) and away from the test suite's bands
(tests/integration/conftest.py: 20000-26000 for replica ranges, 26000-32000 for single ports),
so a benchmark can run while the tests do.
"""

from __future__ import annotations

import random
import socket

SINGLE_BAND = (15000, 19999)  # HTTP, metrics, HAProxy stats, fallback proxy, recipe
BLOCK_BAND = (10000, 14999)  # replicas' direct-ingress and gRPC ranges (blocks of 100)


def accepting(port: int, host: str = "127.0.0.1", timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """The one "is this port free" test: nobody listens and we could bind it."""
    return not accepting(port, host, timeout_s=0.05) and bindable(port, host)


def pick_ports(count: int, band: tuple[int, int] = SINGLE_BAND, rng: random.Random | None = None,
               taken: set[int] | None = None) -> list[int]:
    """``count`` distinct free ports from ``band`` (random, so concurrent runs rarely meet)."""
    rng = rng or random.Random()
    taken = set(taken or ())
    picked: list[int] = []
    for _ in range(2000):
        if len(picked) == count:
            return picked
        port = rng.randint(*band)
        if port not in taken and port_free(port):
            picked.append(port)
            taken.add(port)
    raise RuntimeError(f"no {count} free ports in {band[0]}-{band[1]}")


def pick_block(width: int = 100, band: tuple[int, int] = BLOCK_BAND,
               rng: random.Random | None = None,
               avoid: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """A range ``(low, high)`` of ``width`` ports in which every port is free."""
    rng = rng or random.Random()
    starts = list(range(band[0], band[1] - width + 2, width))
    rng.shuffle(starts)
    for low in starts:
        high = low + width - 1
        if any(not (high < a or low > b) for a, b in (avoid or [])):
            continue
        if all(port_free(p) for p in range(low, high + 1)):
            return low, high
    raise RuntimeError(f"no block of {width} free ports in {band[0]}-{band[1]}")
