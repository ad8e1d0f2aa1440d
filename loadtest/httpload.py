"""A lean closed-loop HTTP/1.1 load generator on raw asyncio streams.

Why not httpx/aiohttp/locust: on a 2-core machine every client cycle is a cycle the server under
test does not get. This client writes pre-built request bytes and parses only the status line, the
headers it needs and a ``Content-Length`` (or chunked) body, so it costs a few tens of
microseconds per request. Each of ``concurrency`` workers owns one keep-alive connection and
sends its next request as soon as the previous answer arrives (closed loop).

Timeline of one run: connect, ``warmup_s`` of load that is not recorded, then ``duration_s``
during which every response that *completes* inside the window is recorded; workers send
nothing after the window closes. ``run_load_in_process`` runs all of this in a fresh process
(spawned, so it shares nothing with the caller), which keeps the client off the server's
event loop and lets its CPU time be measured on its own.

Mixed traffic: pass ``bodies`` (a list of request bodies) and optionally ``weights`` (one per
body) instead of a single body; every request then carries a body drawn at random by weight
(each worker has its own seeded generator, so a run is reproducible). Used by
loadtest/bench_adapters.py to spread requests over many adapters with Zipf popularity.

Standalone: ``python loadtest/httpload.py --url http://127.0.0.1:8000/v1/embeddings
--body '{"model": "minilm", "input": "hi"}' --concurrency 8 --duration 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

GRACE_S = 30.0  # how long in-flight requests may run past the window before they are abandoned


@dataclass
class LoadResult:
    """What one closed-loop run measured. Latencies are of successful (200) responses only."""

    concurrency: int
    duration_s: float
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # "503" or "conn:ExceptionName"
    rps: float = 0.0  # successful responses per second of the window
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    client_cpu_s: float = 0.0  # CPU (user+sys) of the load-generator process inside the window
    other_cpu: float = 0.0  # set by the caller: cores used by processes outside the benchmark
    other_top: str = ""  # set by the caller: the busiest of those processes


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100); 0.0 for an empty list."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100), at least 1
    return sorted_values[int(rank) - 1]


def build_request(url: str, body: bytes, content_type: str = "application/json") -> tuple[str, int, bytes]:
    """(host, port, request bytes) of one keep-alive POST."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return host, port, head.encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return (status, server wants the connection closed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            await reader.readexactly(size + 2)  # chunk data + CRLF (the last chunk: just CRLF)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


def weighted_picker(requests: Sequence[bytes], weights: Sequence[float] | None,
                    seed: int) -> Callable[[], bytes]:
    """A cheap ``() -> request bytes`` drawing from ``requests`` by ``weights`` (uniform when
    None) with its own seeded generator: one ``random()`` and a bisect per request."""
    if len(requests) == 1:
        only = requests[0]
        return lambda: only
    if weights is not None and len(weights) != len(requests):
        raise ValueError(f"{len(weights)} weights for {len(requests)} bodies")
    cum = list(itertools.accumulate(weights if weights is not None else [1.0] * len(requests)))
    total, last = cum[-1], len(requests) - 1
    if not total > 0:
        raise ValueError("weights must add up to a positive number")
    rnd = random.Random(seed).random
    return lambda: requests[min(bisect.bisect_right(cum, rnd() * total), last)]


async def _worker(host, port, request, t_start, t_end, latencies, kinds: Counter,
                  pick: Callable[[], bytes] | None = None) -> None:
    """One connection, one request at a time, until the window ends. With ``pick``, each
    request's bytes come from ``pick()`` instead of ``request``."""
    reader = writer = None
    perf = time.perf_counter
    while True:
        if pick is not None:
            request = pick()
        t0 = perf()
        if t0 >= t_end:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, close = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            if t_start <= perf() <= t_end:
                kinds[f"conn:{type(exc).__name__}"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)  # do not spin on a refusing server
            continue
        t1 = perf()
        if t_start <= t1 <= t_end:
            if status == 200:
                latencies.append(t1 - t0)
            else:
                kinds[str(status)] += 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _run(url, body, concurrency, warmup_s, duration_s, bodies=None, weights=None,
               seed=0) -> LoadResult:
    host, port, request = build_request(url, body)
    picks: list[Callable[[], bytes] | None] = [None] * concurrency
    if bodies:
        requests = [build_request(url, b)[2] for b in bodies]
        picks = [weighted_picker(requests, weights, seed * 100_003 + i) for i in range(concurrency)]
    latencies: list[float] = []
    kinds: Counter = Counter()
    now = time.perf_counter()
    t_start, t_end = now + warmup_s, now + warmup_s + duration_s
    cpu: dict[str, float] = {}

    async def clock() -> None:  # CPU time of this process at the window's edges
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        cpu["end"] = time.process_time()

    tasks = [asyncio.ensure_future(clock())] + [
        asyncio.ensure_future(_worker(host, port, request, t_start, t_end, latencies, kinds, picks[i]))
        for i in range(concurrency)
    ]
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + GRACE_S)
    for t in pending:  # stuck requests past the grace period
        t.cancel()
    if pending:
        kinds["abandoned_in_flight"] += len(pending)
    latencies.sort()
    return LoadResult(
        concurrency=concurrency,
        duration_s=duration_s,
        ok=len(latencies),
        errors=sum(kinds.values()),
        error_kinds=dict(kinds),
        rps=len(latencies) / duration_s,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        client_cpu_s=cpu.get("end", time.process_time()) - cpu.get("start", 0.0),
    )


def run_load(url: str, body: bytes, concurrency: int, warmup_s: float,
             duration_s: float, *, bodies: Sequence[bytes] | None = None,
             weights: Sequence[float] | None = None, seed: int = 0) -> LoadResult:
    """Blocking: one closed-loop run in this process (uvloop when installed, as servers use).
    ``bodies``/``weights``/``seed``: a body drawn per request instead of ``body`` (see above)."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(
            _run(url, body, concurrency, warmup_s, duration_s, bodies, weights, seed)
        )
    finally:
        loop.close()


def run_load_in_process(url: str, body: bytes, concurrency: int, warmup_s: float,
                        duration_s: float, **mixed) -> LoadResult:
    """``run_load`` in a freshly spawned process, so the client never shares a process (or a
    GIL) with a server and its CPU time is its own. ``mixed``: ``bodies``/``weights``/``seed``."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(run_load, url, body, concurrency, warmup_s, duration_s, **mixed).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="request body (JSON text)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=15.0)
    a = p.parse_args(argv)
    result = run_load(a.url, a.body.encode(), a.concurrency, a.warmup, a.duration)
    print(json.dumps(asdict(result), indent=2))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
