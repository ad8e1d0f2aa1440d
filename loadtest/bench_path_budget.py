"""Where a request's CPU goes on the serving path: CPU microseconds per request, per process and,
inside the Router replicas, per stage.

One ``loraserve up`` on the config (free ports, a temporary registry), started once. Per round
and variant (``--variants``, one short sentence per ``POST /v1/embeddings``): a warm-up at c32,
then ``--duration`` seconds at ``--concurrency`` (32) with wrk, during which

1. the CPU seconds (user + system, /proc/<pid>/stat) of every process of the service's tree are
   read before and after, grouped by role (HAProxy, Router replicas, Serve controller, Ray's
   proxy, raylet, GCS, dashboard and agents, the CLI, other): CPU microseconds per answered request;
2. py-spy samples one Router replica (``--nonblocking``: the replica is never paused; Python
   stacks; idle threads not counted). Each sample goes to the first stage that matches one of
   its frames, from the innermost frame outward (``STAGES``): the model call, tokenization, JSON,
   pydantic, metrics, FastAPI/Starlette, the HTTP server, Ray Serve's request machinery, Ray's
   core, asyncio and threads, our own code. A stage's microseconds per request are its share of
   the samples times the replicas' CPU microseconds per request.

Figures: median of ``--reps`` rounds with the spread. Written to loadtest/results/path-budget.md
and .json (``--output`` for another name, e.g. the c1 run's; ``--note`` adds lines to its notes). Usage (from the repository root):
``.venv/bin/python -m loadtest.bench_path_budget [--quick] [--variants onnx-int8,onnx,torch]``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from loadtest import points, report
from loadtest.load import warm, wrk_version
from loadtest.points import Target
from loadtest.report import REPO, Stat, fmt, say
from loadtest.service import TICK, Server, bench_config, wait_quiet, workdir
from serve.processes import cmdline, descendants, proc_stat

NAME, MODULE = "path-budget", "loadtest.bench_path_budget"
TITLE = "Serving path: CPU per request, by process and by stage (one short sentence per request, c{c})"
SENTENCE = "The quick brown fox jumps over the lazy dog."
ROLES = (("HAProxy", "haproxy"), ("Router replicas", "ServeReplica"), ("Serve controller", "ServeController"),
         ("Ray's proxy", "ProxyActor"), ("raylet", "raylet"), ("GCS", "gcs_server"),
         ("dashboard and agents", "dashboard"), ("dashboard and agents", "agent"), ("loraserve CLI", "serve.cli"))
# (stage, substrings of a frame "function (file:line)"), tried per frame from the innermost outward
STAGES = (
    ("model (ONNX Runtime / torch)", ("onnxruntime", "torch/", "transformers/models", "transformers/modeling",
                                      "onnx_backend.py", "torch_backend.py", "lora_slots.py")),
    ("tokenization", ("tokenizers", "tokenization.py", "tokenization_utils")),
    ("JSON", ("json/__init__", "json/encoder", "json/decoder", "orjson", "msgspec")),
    ("pydantic", ("pydantic",)),
    ("metrics", ("ray/util/metrics", "serve/metrics.py", "prometheus", "metrics_utils")),
    ("FastAPI / Starlette", ("fastapi/", "starlette/")),
    ("HTTP server (uvicorn, h11, httptools)", ("uvicorn/", "h11/", "httptools")),
    ("Ray Serve request path", ("ray/serve/",)),
    ("Ray core", ("ray/_private", "ray/_raylet", "ray/actor", "ray/util/")),
    ("asyncio, threads, futures", ("asyncio/", "threading.py", "concurrent/futures", "queue.py", "selectors.py")),
    ("our serving code", (f"{REPO}/serve/", f"{REPO}/models/", "(serve/", "(models/")),
)


def role(pid: int) -> str:
    cmd = cmdline(pid)
    words = cmd.split()
    script = next((w for w in words if w.endswith(".py")), words[0] if words else "?")
    return next((name for name, mark in ROLES if mark in cmd), "other: " + script.rsplit("/", 1)[-1])


def cpu_by_role(root: int) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for pid in [root, *descendants(root)]:
        f = proc_stat(pid)
        if f:
            out[role(pid)] += sum(int(x) for x in f[11:15]) / TICK
    return dict(out)


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for stage, marks in STAGES:
            if any(m in frame for m in marks):
                return stage
    return "other"


def parse_raw(text: str) -> collections.Counter:
    """py-spy's raw (collapsed) output: ``frame;frame;... count`` per line -> samples per stage."""
    got: collections.Counter = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            got[stage_of(stack)] += int(count)
    return got


def window(server: Server, target: Target, duration: float, spy_out: Path) -> dict:
    replica = server.replica_pids()[0]
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(replica),
                            "--duration", str(int(duration)), "--rate", "200", "--nonblocking", "--format", "raw",
                            "--output", str(spy_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = cpu_by_role(server.pid)
    run = points.window(target, duration, server)
    after = cpu_by_role(server.pid)
    spy.wait(timeout=duration + 30)
    answered = run["result"]["ok"]
    cpu_us = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1e6 / max(answered, 1) for k in after}
    stages = parse_raw(spy_out.read_text()) if spy_out.exists() else collections.Counter()
    return {"rps": run["result"]["rps"], "answered": answered, "errors": run["result"]["errors"],
            "cpu_us": cpu_us, "stage_samples": dict(stages), "other_cores": run["other_cores"],
            "client_cpu_share": run["result"]["client_cpu_share"]}


def render(results: dict[str, list[dict]], concurrency: int = 32) -> str:
    out = []
    for variant, runs in results.items():
        roles = sorted({k for r in runs for k in r["cpu_us"]}, key=lambda k: -max(r["cpu_us"].get(k, 0) for r in runs))
        total = Stat.of(sum(r["cpu_us"].values()) for r in runs)
        rows = [f"| {k} | {fmt(Stat.of(r['cpu_us'].get(k, 0.0) for r in runs), 0)} |" for k in roles
                if max(r["cpu_us"].get(k, 0.0) for r in runs) >= 1]
        replica = [r["cpu_us"].get("Router replicas", 0.0) for r in runs]
        names = [s for s, _ in STAGES] + ["other"]
        srows = []
        for s in names:
            per = [rep * r["stage_samples"].get(s, 0) / max(sum(r["stage_samples"].values()), 1)
                   for rep, r in zip(replica, runs)]
            share = [r["stage_samples"].get(s, 0) / max(sum(r["stage_samples"].values()), 1) for r in runs]
            if max(per) >= 1:
                srows.append(f"| {s} | {fmt(Stat.of(per), 0)} | {fmt(Stat.of(100 * x for x in share), 1)} |")
        out.append(
            f"## {variant}\n\nc{concurrency}: {fmt(Stat.of(r['rps'] for r in runs), 1)} req/s; CPU per answered request, all "
            f"processes: {fmt(total, 0)} us.\n\n| process | CPU us per request |\n|---|---:|\n" + "\n".join(rows)
            + "\n\nInside the Router replicas (py-spy on one replica; its stage shares applied to all replicas' CPU):"
            "\n\n| stage | CPU us per request | share of samples % |\n|---|---:|---:|\n" + "\n".join(srows))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 15.0, 5.0)
    p.add_argument("--variants", default="onnx-int8,onnx,torch")
    p.add_argument("--concurrency", type=int, default=32, help="connections in the measured window")
    p.add_argument("--note", action="append", default=[], help="a line for the results file's notes (what was changed)")
    a = points.finish_args(p, p.parse_args(argv))
    from serve.settings import load_settings

    model = load_settings(a.config).models[0].id
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    work, started = workdir(NAME), time.monotonic()
    server = Server.loraserve(NAME, bench_config(a.config, work / "state"), work)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        say(f"starting (log: {report.rel(server.log_path)})")
        server.start()
        server.wait_healthy(a.startup_timeout)
        url = server.base_url + "/v1/embeddings"
        for rep in range(a.reps):
            for v in variants:
                wait_quiet(a.wait_quiet, say)
                target = Target(f"{v} c{a.concurrency}", url, [points.body(f"{model}@{v}", SENTENCE)], a.concurrency)
                say(f"round {rep + 1}/{a.reps}, {v}: warm-up {a.warmup:g} s")
                warm(url, target.bodies, 32, a.warmup)
                results[v].append(window(server, target, a.duration, work / f"spy-{v}-{rep}.txt"))
    finally:
        server.stop()
    notes = [f"one `loraserve up` on {report.rel(a.config)} (free ports, temporary registry); per round and "
             f"variant {a.warmup:g} s warm-up at c32, then {a.duration:g} s at c{a.concurrency} (wrk) while /proc is read and "
             "py-spy samples one Router replica (200 Hz, --nonblocking, idle threads not counted)",
             "CPU us per request: CPU seconds the process group used in the window / requests answered in it; "
             "stages: a sample goes to the first stage matching a frame, innermost first (loadtest/bench_path_budget.py STAGES)",
             f"whole run: {time.monotonic() - started:.0f} s", *a.note]
    facts = report.machine(argv, MODULE, a.reps, {"wrk": wrk_version()})
    md, js = report.write(NAME, TITLE.format(c=a.concurrency), facts, notes, render(results, a.concurrency), {"args": vars(a), "results": results},
                          a.quick, a.output)
    shutil.rmtree(work, ignore_errors=True)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
