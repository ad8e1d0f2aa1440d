"""The backend outside the service: loaded as a replica loads it, timed without HTTP.

``replica_backend`` builds what one Router replica builds for a model and a variant: the
config's spec (so the same ``torch_threads`` / ``onnx.threads``), ``ensure_variants`` for the
ONNX variants (the project's own exported files in the config's variant cache) and
``create_backend``, plus the config's preloaded adapters of that model. ``REPLICA_ENV`` is what
Ray sets in a replica with ``num_cpus: 1`` (one OpenMP / BLAS thread).

``ceiling`` is the in-process ceiling in the service's own layout: as many processes as the
Router has replicas at full load (the Router's ``max_replicas``), spawned, each with one backend,
each looping tokenization + ``predict`` over batches of the same sentence (``batch``: the
model's ``max_batch_size``, 32). All processes start each repetition together (a barrier) and
the figure is their summed throughput. With ``processes=1, batch=1`` it gives the latency of
one sentence through one replica's backend, the floor under the service's p50 at concurrency 1.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time

from loadtest.service import OtherLoad

REPLICA_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def replica_env():
    """``REPLICA_ENV`` in this process's environment while children are spawned (they read it
    when they import torch / numpy), restored afterwards."""
    saved = {k: os.environ.get(k) for k in REPLICA_ENV}
    os.environ.update(REPLICA_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100); 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def model_spec(settings, model_id: str | None = None):
    """The config's model ``model_id`` (default: the first)."""
    for spec in settings.models:
        if model_id in (None, spec.id):
            return spec
    raise SystemExit(f"the config serves no model {model_id!r}")


def replica_backend(config: str, model_id: str | None, variant: str, spec_update: dict | None = None,
                    with_adapters: bool = True):
    """A loaded backend as a replica has it (see the module docstring); returns (backend, names
    of the adapters added)."""
    from models import base_weight_shapes, create_backend, ensure_variants, read_labels, validate_adapter
    from serve.settings import load_settings

    settings = load_settings(config)
    spec = model_spec(settings, model_id)
    if spec_update:
        spec = spec.model_copy(update=spec_update)
    cache = settings.variants.cache_path()
    if variant != "torch":
        ensure_variants(spec, cache)
    backend = create_backend(spec, variant, cache)
    backend.load()
    names = []
    if with_adapters:
        roots = settings.adapters.store_roots()
        shapes = base_weight_shapes(backend.path)
        for a in settings.adapters.preload:
            if a.base != spec.id:
                continue
            check = validate_adapter(a.path, roots, base_shapes=shapes, task=None,
                                     max_rank=spec.adapters.max_rank, base_task=spec.task)
            backend.add_adapter(a.name, check, check.task, read_labels(check.path))
            names.append(a.name)
    return backend, names


_prepared: set[str] = set()


def prepare(config: str) -> None:
    """Build (or find) the config's ONNX variants once per run, in a child process, as
    ``loraserve up`` does before any replica starts."""
    if config not in _prepared:
        from serve.launcher import prepare_variants
        from serve.settings import load_settings

        prepare_variants(load_settings(config))
        _prepared.add(config)


def loop(fn, seconds: float, min_calls: int = 1) -> tuple[list[float], float, float]:
    """Call ``fn`` for ``seconds`` (at least ``min_calls`` times): (per-call seconds, elapsed,
    CPU seconds of this process)."""
    perf = time.perf_counter
    lat: list[float] = []
    cpu0, start = time.process_time(), perf()
    while len(lat) < min_calls or perf() - start < seconds:
        t0 = perf()
        fn()
        lat.append(perf() - t0)
    return lat, perf() - start, time.process_time() - cpu0


def _child(config: str, model_id: str | None, variant: str, sentence: str, batch: int,
           warm_s: float, duration_s: float, reps: int, barrier, results, index: int) -> None:
    try:
        backend, _ = replica_backend(config, model_id, variant)
        texts = [sentence] * batch

        def step():
            out = backend.predict(backend.encode(texts))
            assert len(out) == batch

        loop(step, warm_s)
        for rep in range(reps):
            barrier.wait(timeout=600)
            other = OtherLoad(os.getppid()).start()  # the benchmark's tree holds every child
            lat, elapsed, cpu = loop(step, duration_s)
            lat.sort()
            results.put({"index": index, "rep": rep, "sentences": batch * len(lat),
                         "elapsed_s": elapsed, "cpu_s": cpu, "p50_ms": percentile(lat, 50) * 1000,
                         "p99_ms": percentile(lat, 99) * 1000, "other_cores": other.stop()})
        backend.close()
    except BaseException as exc:  # report it to the parent instead of hanging its barrier
        barrier.abort()
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})


def ceiling(config: str, variant: str, processes: int, batch: int, sentence: str,
            warm_s: float, duration_s: float, reps: int, model_id: str | None = None) -> list[dict]:
    """Per repetition: {"rps": summed sentences/s, "p50_ms"/"p99_ms": median / max over the
    processes of per-batch latency, "cores": their CPU / wall, "other_cores": what processes
    outside the benchmark used meanwhile, "per_process": [...]}."""
    if variant != "torch":
        prepare(config)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    with replica_env():
        procs = [ctx.Process(target=_child, name=f"loadtest-ceiling-{i}", daemon=True,
                             args=(config, model_id, variant, sentence, batch, warm_s, duration_s,
                                   reps, barrier, results, i))
                 for i in range(processes)]
        for p in procs:
            p.start()
    got: list[dict] = []
    deadline = time.monotonic() + 900 + reps * (duration_s + 60)
    try:
        while len(got) < processes * reps and time.monotonic() < deadline:
            try:
                item = results.get(timeout=5)
            except Exception:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if "error" in item:
                raise RuntimeError(f"ceiling process {item['index']} ({variant}): {item['error']}")
            got.append(item)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if len(got) < processes * reps:
        raise RuntimeError(f"ceiling ({variant}): {len(got)} of {processes * reps} results arrived")
    out = []
    for rep in range(reps):
        rows = sorted((g for g in got if g["rep"] == rep), key=lambda g: g["index"])
        out.append({
            "rps": sum(g["sentences"] / g["elapsed_s"] for g in rows),
            "p50_ms": statistics.median(g["p50_ms"] for g in rows),
            "p99_ms": max(g["p99_ms"] for g in rows),
            "cores": sum(g["cpu_s"] / g["elapsed_s"] for g in rows),
            "other_cores": max(g["other_cores"] for g in rows),
            "per_process": rows,
        })
    return out
