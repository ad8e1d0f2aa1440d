"""The in-process ceiling: the service's own backend, called directly, with no HTTP at all.

It builds the backend exactly as the service does (``create_backend`` on the config's first model
and its default variant), then gives torch every core. For each batch size n it loops
``predict(encode([sentence] * n))`` for a fixed time, so tokenization is included, as it is in the
service. "Batches of 32" is the ceiling the issue defines: what the service could at best do
with 32 concurrent one-sentence requests if batching and HTTP were free.

Throughput is sentences per second; p50/p99 are of per-batch latency. ``measure_in_process``
runs it all in a freshly spawned process so the benchmark's own process stays free of torch
and its thread pool while the servers are measured.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from cpuwatch import OtherCpu, wait_quiet
from httpload import LoadResult, percentile


def measure(config: str, sentence: str, batch_sizes: list[int], warmup_s: float,
            duration_s: float, root_pid: int | None = None, quiet_s: float = 0.0,
            say=print, threads: int | None = None) -> list[LoadResult]:
    """Blocking; loads the model in this process. ``root_pid``: the benchmark's process, whose
    descendants do not count as other load (default: this process); before each batch size,
    wait up to ``quiet_s`` for the rest of the machine to go idle."""
    import torch

    from models.backend import create_backend
    from serve.launcher import app_args, load_config
    from serve.settings import AppSettings

    settings = AppSettings.model_validate(app_args(load_config(config)))
    spec = settings.models[0]
    backend = create_backend(spec, spec.default_variant)
    backend.load()  # applies spec.torch_threads
    torch.set_num_threads(threads or os.cpu_count() or 1)  # the ceiling uses every core
    results = []
    try:
        for n in batch_sizes:
            texts = [sentence] * n
            if quiet_s:
                wait_quiet(root_pid or os.getpid(), quiet_s, say)
            _loop(backend, texts, warmup_s)
            cpu0 = time.process_time()
            watch = OtherCpu(root_pid or os.getpid()).start()
            latencies, elapsed = _loop(backend, texts, duration_s)
            other_s, wall = watch.stop()
            latencies.sort()
            results.append(LoadResult(
                concurrency=n,
                duration_s=elapsed,
                ok=n * len(latencies),
                rps=n * len(latencies) / elapsed,
                p50_ms=percentile(latencies, 50) * 1000,
                p99_ms=percentile(latencies, 99) * 1000,
                client_cpu_s=time.process_time() - cpu0,  # here: the backend's own CPU time
                other_cpu=other_s / wall,
                other_top=watch.top,
            ))
    finally:
        backend.close()
    return results


def _loop(backend, texts: list[str], seconds: float) -> tuple[list[float], float]:
    """Run whole batches for ``seconds``; return per-batch latencies and the time they took."""
    latencies = []
    perf = time.perf_counter
    start = perf()
    while perf() - start < seconds:
        t0 = perf()
        out = backend.predict(backend.encode(texts))
        latencies.append(perf() - t0)
    assert out.shape[0] == len(texts), out.shape
    return latencies, perf() - start


def measure_in_process(config: str, sentence: str, batch_sizes: list[int], warmup_s: float,
                       duration_s: float, quiet_s: float = 0.0,
                       threads: int | None = None) -> list[LoadResult]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        job = pool.submit(measure, config, sentence, batch_sizes, warmup_s, duration_s,
                          os.getpid(), quiet_s, _say, threads)
        return job.result()


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
