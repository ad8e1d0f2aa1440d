"""Embeddings: loraserve served vs. its in-process ceiling vs. the per-request recipe.

One short sentence per request (``POST /v1/embeddings``, the config's first model, its default
variant), closed loop from wrk at each ``--concurrency`` (1, 8, 32). Setups, one after another so
they never share the cores:

- ``ceiling``: the in-process ceiling in the service's layout (``loadtest.inprocess``):
  the Router's ``max_replicas`` processes, each with the backend as a replica loads it, looping over
  batches of ``max_batch_size`` sentences; summed sentences/s. Also one sentence at a time in one
  such process (the floor under the service's p50 at concurrency 1).
- ``service``: ``loraserve up`` on the config (free ports, a temporary registry; nothing else
  changed: the Router autoscales as configured, and each round starts with a warm-up at c32).
- ``recipe-tutorial`` and ``recipe-tuned``: FastAPI + transformers, one forward pass per request
  (``loadtest/recipe_fastapi.py`` says how each is set up).

Each figure is the median of ``--reps`` repetitions (spread in brackets). Written to
loadtest/results/embeddings.md and .json.

Usage (from the repository root): ``.venv/bin/python -m loadtest.bench_embeddings [--quick]
[--setups ceiling,service] [--concurrency 1,32]``, or ``make bench-embeddings``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from loadtest import inprocess, points, report
from loadtest.load import wrk_version
from loadtest.points import Target
from loadtest.ports import pick_ports
from loadtest.report import Stat, fmt, ratio, say
from loadtest.service import BUSY, Server, bench_config, wait_quiet, workdir

NAME, MODULE = "embeddings", "loadtest.bench_embeddings"
TITLE = "Embeddings: loraserve vs. its in-process ceiling vs. the per-request recipe"
SENTENCE = "The quick brown fox jumps over the lazy dog."
SETUPS = ("ceiling", "service", "recipe-tutorial", "recipe-tuned")


def parse_args(argv):
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 15.0, 5.0)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"subset of {','.join(SETUPS)}")
    a = points.finish_args(p, p.parse_args(argv))
    a.levels = sorted({int(c) for c in a.concurrency.split(",") if c.strip()})
    a.setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    if set(a.setups) - set(SETUPS) or not a.levels or a.levels[0] < 1:
        p.error(f"bad --setups or --concurrency; setups: {','.join(SETUPS)}")
    return a


def run_ceiling(a, spec, replicas: int, notes: list[str]) -> dict:
    out = {}
    batch = spec.batching.max_batch_size
    for key, procs, size in (("ceiling", replicas, batch), ("one sentence", 1, 1)):
        wait_quiet(a.wait_quiet, say)
        say(f"in process: {procs} process(es) x batches of {size}, {a.reps} x {a.duration:g} s")
        try:
            reps = inprocess.ceiling(a.config, spec.default_variant, procs, size, SENTENCE,
                                     a.warmup, a.duration, a.reps, spec.id)
        except Exception as exc:
            notes.append(f"in-process {key} FAILED: {type(exc).__name__}: {exc}")
            say(notes[-1])
            continue
        out[key] = {"processes": procs, "batch": size, "reps": reps,
                    "other_cores_max": max(r["other_cores"] for r in reps),
                    **{k: Stat.of(r[k] for r in reps) for k in ("rps", "p50_ms", "p99_ms", "cores")}}
        say(f"  {key}: {fmt(out[key]['rps'])} sentences/s, p50 {fmt(out[key]['p50_ms'], 2)} ms/batch")
    return out


def run_server(a, server: Server, model: str, notes: list[str]) -> dict:
    """Start, measure every level in ``a.reps`` rounds, stop; {level: summary}."""
    try:
        say(f"starting {server.name} (log: {report.rel(server.log_path)})")
        server.start()
        took = server.wait_healthy(a.startup_timeout)
        notes.append(f"{server.name}: healthy {took:.0f} s after start")
        url = server.base_url + "/v1/embeddings"
        targets = [Target(f"{server.name} c{c}", url, [points.body(model, SENTENCE)], c)
                   for c in a.levels]
        runs = points.rounds({server.name: targets}, a.reps, a.warmup, a.duration,
                             lambda _: server, a.wait_quiet)
        return {c: points.summary(runs[f"{server.name} c{c}"]) for c in a.levels}
    except Exception as exc:
        notes.append(f"{server.name} FAILED: {type(exc).__name__}: {exc}")
        say(notes[-1])
        return {}
    finally:
        server.stop()
        if server.leftovers:
            notes.append(f"{server.name}: killed after stop: " + "; ".join(server.leftovers))


def render(a, spec, replicas: int, inproc: dict, served: dict[str, dict]) -> str:
    lines = [points.TABLE_HEAD]
    batch = spec.batching.max_batch_size
    for key, label in (("ceiling", f"in-process ceiling: {replicas} processes x batches of {batch}"),
                       ("one sentence", "in process: one sentence, one process")):
        r = inproc.get(key)
        if r:
            other = f"{r['other_cores_max']:.2f}" + (" (!)" if r["other_cores_max"] > BUSY else "")
            lines.append(f"| {label} | - | {fmt(r['rps'])} | {fmt(r['p50_ms'], 2)} | "
                         f"{fmt(r['p99_ms'], 2)} | 0 | - | {fmt(r['cores'], 2)} | {other} | - |")
    for name, levels in served.items():
        for c, s in levels.items():
            lines.append(points.table_row(name, c, s))
    top = max(a.levels)
    svc = served.get("service", {})
    ceil, one = inproc.get("ceiling", {}).get("rps"), inproc.get("one sentence", {})
    lines += ["", "In-process rows: req/s = sentences/s, p50/p99 = per batch; their \"server "
              "cores\" column is the CPU the processes used. wrk CPU: the load generator's CPU "
              "time over wall time.", "", "Ratios (median over median; spread from the extremes):", ""]
    if svc.get(top) and ceil:
        lines.append(f"- service at c{top} / in-process ceiling: "
                     f"{fmt(ratio(svc[top]['rps'], ceil), 2, 'x')}")
    for recipe in ("recipe-tutorial", "recipe-tuned"):
        if svc.get(top) and served.get(recipe, {}).get(top):
            lines.append(f"- service / {recipe} at c{top}: "
                         f"{fmt(ratio(svc[top]['rps'], served[recipe][top]['rps']), 2, 'x')}")
    if svc.get(1) and one:
        gap = svc[1]["p50_ms"].median - one["p50_ms"].median
        lines.append(f"- service p50 at c1: {fmt(svc[1]['p50_ms'], 2)} ms; one sentence in process: "
                     f"{fmt(one['p50_ms'], 2)} ms; the serving path adds {gap:.2f} ms (medians)")
    note = points.disturbed_note({**{f"{n} c{c}": s for n, lv in served.items() for c, s in lv.items()},
                                  **{f"in process, {k}": v for k, v in inproc.items()}})
    return "\n".join(lines + (["", note] if note else []))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    from models import resolve_source
    from serve.settings import load_config, load_settings, replica_bounds

    settings = load_settings(a.config)
    spec = settings.models[0]
    replicas = replica_bounds(load_config(a.config))[1]
    work = workdir(NAME)
    notes = [
        f"request: POST /v1/embeddings {points.body(spec.id, SENTENCE)}; closed loop (wrk, one "
        f"keep-alive connection per client); per round: {a.warmup:g} s warm-up at c32, then "
        f"{a.duration:g} s per concurrency level",
        f"service: {report.rel(a.config)} with free ports and a temporary registry; the Router "
        f"runs {replica_bounds(load_config(a.config))[0]}-{replicas} replicas, {spec.id} with torch_threads "
        f"{spec.torch_threads}, onnx threads {spec.onnx.threads}, variant {spec.default_variant}",
        f"in-process ceiling: {replicas} spawned processes (the Router's max_replicas), each "
        f"loading the backend as a replica does and looping tokenization + predict over batches "
        f"of {spec.batching.max_batch_size} (max_batch_size), started together; sentences/s summed",
        f"other cores: CPU used by processes outside the benchmark meanwhile (flagged above {BUSY})",
    ]
    started = time.monotonic()
    inproc = run_ceiling(a, spec, replicas, notes) if "ceiling" in a.setups else {}
    served: dict[str, dict] = {}
    if "service" in a.setups:
        cfg = bench_config(a.config, work / "state")
        served["service"] = run_server(a, Server.loraserve("service", cfg, work), spec.id, notes)
    model_path = str(resolve_source(spec.source))
    for mode in ("tutorial", "tuned"):
        name = f"recipe-{mode}"
        if name in a.setups:
            port = pick_ports(1)[0]
            argv_r = [sys.executable, "-m", "loadtest.recipe_fastapi", "--mode", mode, "--port",
                      str(port), "--model-path", model_path]
            served[name] = run_server(a, Server(name, argv_r, port, work / f"{name}.log"), spec.id, notes)
    notes.append("recipe-tutorial: plain `def` endpoint (FastAPI's thread pool: every request at "
                 "once), 1 uvicorn worker, torch's default threads; recipe-tuned: `async def` "
                 "endpoint with the model behind an asyncio.Lock (one forward pass at a time, on "
                 "torch's default threads), 1 uvicorn worker")
    notes.append(f"whole run: {time.monotonic() - started:.0f} s")
    body = render(a, spec, replicas, inproc, served)
    problems = [n for n in notes if "FAILED" in n]
    if problems:
        body += "\n\nProblems:\n" + "\n".join(f"- {n}" for n in problems)
    facts = report.machine(argv, MODULE, a.reps, {"wrk": wrk_version()})
    md, js = report.write(NAME, TITLE, facts, notes, body,
                          {"args": vars(a), "inprocess": inproc, "served": served}, a.quick, a.output)
    if problems:
        say(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    errors = any(sum(s["errors"].values()) for lv in served.values() for s in lv.values())
    return 1 if problems or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
