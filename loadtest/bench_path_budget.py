"""Where a request's CPU goes on the serving path: CPU microseconds per request, per process and,
inside the Router replicas, per stage.

One ``loraserve up`` on the config (free ports, a temporary registry, the Router pinned at its
``max_replicas``: a quiet c1 minute would otherwise let the autoscaler drop a replica and start it
again inside later windows), started once. Per round
and variant (``--variants``, one short sentence per ``POST /v1/embeddings``): a warm-up at c32,
then ``--duration`` seconds at ``--concurrency`` (32) with wrk, during which

1. the CPU seconds (user + system, /proc/<pid>/stat) of every process of the service's tree are
   read before and after, grouped by role (HAProxy, Router replicas, Serve controller, Ray's
   proxy, raylet, GCS, dashboard and agents, the CLI, other): CPU microseconds per answered request;
2. inside the Router replicas, each thread's CPU seconds (/proc/<pid>/task/<tid>/stat), grouped:
   the event loop, the model's executor thread (where ONNX Runtime / torch run), Ray's main
   thread, Ray's C++ threads (no Python stack: gRPC, I/O, metrics), other Python threads;
3. py-spy samples one replica's GIL holder (``--gil --nonblocking``: never paused; only a thread
   running Python or C code under the GIL is sampled, so an idle thread never counts, and
   neither does ONNX Runtime's or torch's compute, which releases the GIL). Each sample goes to
   the first stage that matches one of its frames, from the innermost frame outward
   (``STAGES``): tokenization, JSON, pydantic, metrics, FastAPI/Starlette, the HTTP server, Ray
   Serve's request machinery, Ray's core, asyncio and threads, our own code. Samples measure wall
   time under the GIL (a holder the scheduler preempts still holds it), so they give shares; the
   shares split the replicas' Python CPU, and the model threads' CPU less their share is the
   model's compute (``cpu_split``).

Figures: median of ``--reps`` rounds with the spread. Written to loadtest/results/path-budget.md
and .json (``--output`` for another name, e.g. the c1 run's; ``--note`` adds lines to its notes). Usage (from the repository root):
``.venv/bin/python -m loadtest.bench_path_budget [--quick] [--variants onnx-int8,onnx,torch]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
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
RATE = 200  # py-spy samples per second
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


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread id of one process (a thread's stat is also at /proc/<tid>)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        f = proc_stat(int(tid))
        if f:
            out[tid] = (int(f[11]) + int(f[12])) / TICK
    return out


def thread_names(pid: int) -> dict[str, str]:
    """Python thread names by thread id (``py-spy dump``); threads without one are Ray's C++."""
    dump = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(pid), "--nonblocking"],
                          capture_output=True, text=True, timeout=60).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r'^Thread (?:0x[0-9a-fA-F]+ )?\(?(\d+)\)?[^"\n]*"([^"]*)"', dump, re.M)}


def thread_group(name: str | None, model: str) -> str:
    if name is None:
        return "Ray's C++ threads (gRPC, I/O, metrics)"
    if name.startswith("AsyncIO Thread"):
        return "event loop"
    if name.startswith(f"{model}-"):
        return "model executor thread"
    if name == "MainThread":
        return "Ray's main thread"
    return "other Python threads"


def gil_samples(text: str, model: str) -> tuple[collections.Counter, int]:
    """py-spy ``--gil --threads`` raw output: samples per stage, and the model threads' samples."""
    stages: collections.Counter = collections.Counter()
    model_samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            thread, frames = frames[0], frames[1:]
            if f": {model}-" in thread:
                model_samples += int(count)
        stages[stage_of(";".join(frames))] += int(count)
    return stages, model_samples


def window(server: Server, target: Target, duration: float, spy_out: Path, model: str) -> dict:
    replicas = server.replica_pids()
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(replicas[0]),
                            "--duration", str(int(duration)), "--rate", str(RATE), "--nonblocking", "--gil",
                            "--threads", "--format", "raw", "--output", str(spy_out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before, threads_before = cpu_by_role(server.pid), {p: thread_cpu(p) for p in replicas}
    run = points.window(target, duration, server)
    after, threads_after = cpu_by_role(server.pid), {p: thread_cpu(p) for p in replicas}
    spy.wait(timeout=duration + 30)
    answered = run["result"]["ok"]
    per = max(answered, 1)
    cpu_us = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1e6 / per for k in after}
    groups: dict[str, float] = collections.defaultdict(float)
    for pid in replicas:
        names = thread_names(pid)
        for tid, t in threads_after[pid].items():
            groups[thread_group(names.get(tid), model)] += (t - threads_before[pid].get(tid, 0.0)) * 1e6 / per
    groups["not attributed (exited threads, reaped children)"] = cpu_us.get("Router replicas", 0.0) - sum(groups.values())
    stages, model_samples = gil_samples(spy_out.read_text(), model) if spy_out.exists() else (collections.Counter(), 0)
    share = max(answered / len(replicas), 1)  # the sampled replica's requests
    gil_us = {k: v / RATE * 1e6 / share for k, v in stages.items()}
    compute = groups.get("model executor thread", 0.0) - model_samples / RATE * 1e6 / share
    return {"rps": run["result"]["rps"], "p50_ms": run["result"].get("p50_ms"), "answered": answered,
            "errors": run["result"]["errors"], "cpu_us": cpu_us, "thread_us": dict(groups), "gil_us": gil_us,
            "model_compute_us": compute, "other_cores": run["other_cores"],
            "client_cpu_share": run["result"]["client_cpu_share"]}


def _rows(runs: list[dict], key: str, order: list[str] | None = None) -> list[str]:
    names = order or sorted({k for r in runs for k in r[key]}, key=lambda k: -max(r[key].get(k, 0.0) for r in runs))
    return [f"| {k} | {fmt(Stat.of(r[key].get(k, 0.0) for r in runs), 0)} |" for k in names
            if max(r[key].get(k, 0.0) for r in runs) >= 1]


PYTHON_THREADS = ("event loop", "Ray's main thread", "other Python threads")


def cpu_split(run: dict) -> tuple[dict[str, float], float]:
    """Stage CPU us per request and the model's compute, from one window. GIL samples count wall
    time under the GIL (a holder the scheduler preempts still holds it), so they give shares, not
    times: the shares split the replicas' Python CPU, which is the Python threads' CPU plus the
    model threads' share of the samples (f): python = others / (1 - f); compute = model thread
    CPU - f x python."""
    gil = run["gil_us"]
    total = sum(gil.values()) or 1.0
    model = run["thread_us"].get("model executor thread", 0.0)
    f = min(max((model - run["model_compute_us"]) / total, 0.0), 0.99)
    python = sum(run["thread_us"].get(k, 0.0) for k in PYTHON_THREADS) / (1 - f)
    return {k: v / total * python for k, v in gil.items()}, model - f * python


def render(results: dict[str, list[dict]], concurrency: int = 32) -> str:
    out = []
    for variant, runs in results.items():
        total = Stat.of(sum(r["cpu_us"].values()) for r in runs)
        split = [cpu_split(r) for r in runs]
        stages = [{"stage_cpu_us": st} for st, _ in split]
        p50 = fmt(Stat.of(r["p50_ms"] for r in runs), 2) if all(r.get("p50_ms") for r in runs) else "-"
        out.append(
            f"## {variant}\n\nc{concurrency}: {fmt(Stat.of(r['rps'] for r in runs), 1)} req/s, p50 {p50} ms; CPU per "
            f"answered request, all processes: {fmt(total, 0)} us.\n\n| process | CPU us per request |\n|---|---:|\n"
            + "\n".join(_rows(runs, "cpu_us"))
            + "\n\nThe Router replicas by thread (/proc, all replicas):\n\n| thread | CPU us per request |\n|---|---:|\n"
            + "\n".join(_rows(runs, "thread_us"))
            + f"\n\nModel compute (the model threads' CPU less their Python share): "
            f"{fmt(Stat.of(c for _, c in split), 0)} us per request. The replicas' Python work by stage (shares "
            "of py-spy's GIL samples on one replica, applied to the replicas' Python CPU; `cpu_split`):"
            "\n\n| stage | CPU us per request |\n|---|---:|\n"
            + "\n".join(_rows(stages, "stage_cpu_us", [s for s, _ in STAGES] + ["other"])))
    return "\n\n".join(out)


def rerender(path: str) -> Path:
    """Write a results file's markdown again from its JSON (after a change to the tables)."""
    import json

    data = json.loads(Path(path).read_text())
    c = data["args"]["concurrency"]
    md = Path(path).with_suffix(".md")
    notes = [*data["notes"], f"tables written again from this file's JSON by `--rerender` at commit {report.commit()}"]
    md.write_text(report.header(data["title"], data["machine"], notes, data.get("smoke_run", False))
                  + "\n" + render(data["results"], c).rstrip() + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rerender"]:
        say(f"written to {report.rel(rerender(argv[1]))}")
        return 0
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 15.0, 5.0)
    p.add_argument("--variants", default="onnx-int8,onnx,torch")
    p.add_argument("--concurrency", type=int, default=32, help="connections in the measured window")
    p.add_argument("--note", action="append", default=[], help="a line for the results file's notes (what was changed)")
    a = points.finish_args(p, p.parse_args(argv))
    from serve.settings import load_config, load_settings, replica_bounds

    model = load_settings(a.config).models[0].id
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    work, started = workdir(NAME), time.monotonic()
    # pinned at the Router's max_replicas: the autoscaler would otherwise drop a replica during a
    # quiet c1 minute and start it again (tens of CPU seconds) inside the next windows
    replicas = replica_bounds(load_config(a.config))[1]
    server = Server.loraserve(NAME, bench_config(a.config, work / "state", replicas=replicas), work)
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
                results[v].append(window(server, target, a.duration, work / f"spy-{v}-{rep}.txt", model))
    finally:
        server.stop()
    notes = [f"one `loraserve up` on {report.rel(a.config)} (free ports, temporary registry, the Router pinned at "
             f"its max_replicas, {replicas}: no autoscaling between windows); per round and "
             f"variant {a.warmup:g} s warm-up at c32, then {a.duration:g} s at c{a.concurrency} (wrk) while /proc is read (processes, "
             f"and every replica's threads) and py-spy samples one replica's GIL holder ({RATE} Hz, --gil --nonblocking)",
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
