"""Serving-path levers: the service measured once per variation of deploy/local.yaml.

Each lever is a change to the config, applied by ``loadtest.service.bench_config`` (no config
copies to keep in sync): the ingress (HAProxy + direct ingress, or Ray's Python proxy, with or
without ``RAY_SERVE_THROUGHPUT_OPTIMIZED``), the Router's replicas x torch threads, one hop or
two (the model in a deployment of its own), and a batch wait. Every lever serves only the torch
variant (so the two-hop layout fits on 2 CPUs; the default's ONNX variants take memory, not
speed, from torch requests). Per lever: start, then ``--reps`` rounds of a warm-up at c32 and
one-sentence ``POST /v1/embeddings`` at c32 and c1; stop. Levers run one after another, so
compare medians, and mind the spread.

Written to loadtest/results/levers.md and .json. Usage (from the repository root):
``.venv/bin/python -m loadtest.bench_levers [--quick] [--only haproxy-2x1,haproxy-1x2]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from loadtest import points, report
from loadtest.load import wrk_version
from loadtest.points import Target
from loadtest.report import fmt, say
from loadtest.service import BUSY, Server, bench_config, workdir

NAME, MODULE = "levers", "loadtest.bench_levers"
TITLE = "Serving-path levers (service only, torch, one sentence per request)"
SENTENCE = "The quick brown fox jumps over the lazy dog."
THROUGHPUT = ("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE",
              "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "RAY_SERVE_LOG_TO_STDERR", "RAY_SERVE_USE_GRPC_BY_DEFAULT",
              "RAY_SERVE_FREEZE_GC_ON_STARTUP")
# Ray's Python proxy with Ray's default flags: deploy/ray.env's fast-path lines removed.
PROXY = {"ray_env": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                     **dict.fromkeys(THROUGHPUT)}}
PROXY_THROUGHPUT = {"ray_env": {"RAY_SERVE_ENABLE_HA_PROXY": "0"}}
TWO_THREADS = {"torch_threads": 2}
SEPARATE = {"deployments": {
    "Router": {"ray_actor_options": {"num_cpus": 0.5}},
    "ModelServer-minilm-torch": {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 2,
                                                        "target_ongoing_requests": 8},
                                 "ray_actor_options": {"num_cpus": 0.5}}}}
# name: (what differs from deploy/local.yaml + deploy/ray.env, Router replicas (None: as configured),
#        bench_config changes (deployments, ray_env), model settings)
LEVERS: dict[str, tuple[str, int | None, dict, dict]] = {
    "proxy-1x2": ("Ray's Python proxy, default flags, 1 replica x 2 torch threads", 1, PROXY, TWO_THREADS),
    "proxy-2x1": ("Ray's Python proxy, default flags, 2 replicas x 1 torch thread", 2, PROXY, {}),
    "proxy-throughput-1x2": ("Python proxy + the throughput-optimized switches, 1 replica x 2 threads", 1,
                             PROXY_THROUGHPUT, TWO_THREADS),
    "haproxy-1x2": ("HAProxy + throughput flag, 1 replica x 2 torch threads", 1, {}, TWO_THREADS),
    "haproxy-2x1": ("the default: HAProxy + throughput flag, 2 replicas x 1 torch thread", None, {}, {}),
    "haproxy-2x1-two-hops": (
        "HAProxy, Router (0.5 CPU, 1 replica) -> model deployment 2 x 1 thread (0.5 CPU each): two hops", 1,
        SEPARATE, {"placement": "separate"}),
    "haproxy-2x1-wait2ms": ("the default + batching.max_wait_ms: 2", None, {}, {"batching": {"max_wait_ms": 2}}),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 10.0, 5.0)
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(LEVERS)}")
    a = points.finish_args(p, p.parse_args(argv))
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(LEVERS)
    if a.quick and not a.only:
        names = ["haproxy-1x2", "haproxy-2x1"]
    if set(names) - set(LEVERS):
        p.error(f"--only: choose from {','.join(LEVERS)}")
    from serve.settings import load_settings

    model = load_settings(a.config).models[0].id
    work, started, notes, results = workdir(NAME), time.monotonic(), [], {}
    for name in names:
        what, replicas, changes, model_patch = LEVERS[name]
        cfg = bench_config(a.config, work / f"state-{name}", replicas=replicas, **changes,
                           model={**model_patch, "variants": ["torch"], "default_variant": "torch"})
        server = Server.loraserve(name, cfg, work)
        try:
            say(f"lever {name}: starting (log: {report.rel(server.log_path)})")
            server.start()
            server.wait_healthy(a.startup_timeout)
            url = server.base_url + "/v1/embeddings"
            targets = [Target(f"{name} c{c}", url, [points.body(model, SENTENCE)], c) for c in (32, 1)]
            runs = points.rounds({name: targets}, a.reps, a.warmup, a.duration, lambda _, s=server: s,
                                 a.wait_quiet)
            results[name] = {c: points.summary(runs[f"{name} c{c}"]) for c in (32, 1)}
        except Exception as exc:
            notes.append(f"{name} FAILED: {type(exc).__name__}: {exc}")
            say(notes[-1])
        finally:
            server.stop()
    lines = ["| lever | what differs from deploy/local.yaml | c32 req/s | c32 p50 ms | c1 p50 ms | c1 p99 ms "
             "| errors | wrk CPU c32 / c1 | other cores (max) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        other = max(r[32]["other_cores_max"], r[1]["other_cores_max"])
        errors = sum(sum(r[c]["errors"].values()) for c in (32, 1))
        lines.append(f"| {name} | {LEVERS[name][0]} | {fmt(r[32]['rps'])} | {fmt(r[32]['p50_ms'], 1)} | "
                     f"{fmt(r[1]['p50_ms'], 1)} | {fmt(r[1]['p99_ms'], 1)} | {errors} | "
                     f"{100 * r[32]['client_cpu_share'].median:.1f}% / {100 * r[1]['client_cpu_share'].median:.1f}% | "
                     f"{other:.2f}{' (!)' if other > BUSY else ''} |")
    notes[:0] = [f"each lever: {report.rel(a.config)} with free ports, a temporary registry, only the torch "
                 f"variant, and the change named; {a.reps} rounds of {a.warmup:g} s warm-up at c32, then "
                 f"{a.duration:g} s at c32 and at c1; levers one after another",
                 f"whole run: {time.monotonic() - started:.0f} s"]
    problems = [n for n in notes if "FAILED" in n]
    body = "\n".join(lines + (["", "Problems:", *[f"- {n}" for n in problems]] if problems else []))
    facts = report.machine(argv, MODULE, a.reps, {"wrk": wrk_version()})
    md, js = report.write(NAME, TITLE, facts, notes, body,
                          {"args": vars(a), "levers": {n: LEVERS[n] for n in names}, "results": results},
                          a.quick, a.output)
    if problems:
        say(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    return 1 if problems or any(sum(s["errors"].values()) for r in results.values() for s in r.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
