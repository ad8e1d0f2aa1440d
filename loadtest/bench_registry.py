"""The adapter registry at scale: 10,000 registered adapters, hot loads idle and under traffic,
registry disk and memory per adapter.

1. Store: ``--bg-n`` synthetic adapters on minilm for the background traffic and fresh ones for
   the hot loads (``loadtest.adapters_kit``), plus fillers up to ``--registered``: hard links
   to the first adapter's files (valid adapters, no disk), each registered under its own name.
2. ``loraserve up`` on the config (free ports, a temporary registry, the store as its only
   adapter store). Every adapter registered through ``POST /v1/load_lora_adapter`` (4 calls
   in parallel), in chunks of ``--chunk``: the admin call's p50 per chunk shows whether a
   change costs more as the registry grows.
3. Disk (``adapters.json`` + ``adapters.log``) and memory (VmRSS of the registry actor and of
   the Router replicas, before and after registering) per adapter.
4. Hot loads (``loadtest.bench_adapters.hot_phase``): for fresh adapters, the admin call (what
   the issue calls hot-load latency: registered, validated and applied by every live replica)
   and the first ``/v1/classify`` of each; idle, and under Zipf traffic (N = ``--bg-n``, c16).

Written to loadtest/results/registry.md and .json. Usage: ``.venv/bin/python -m
loadtest.bench_registry [--quick] [--registered 10000]``, or ``make bench-registry``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from loadtest import adapters_kit as kit
from loadtest import points, report
from loadtest.bench_adapters import BASE, hot_table, service
from loadtest.bench_adapters import hot_phase as hot_loads_phase
from loadtest.inprocess import percentile
from loadtest.report import Stat, fmt, say
from loadtest.service import Server, memory_mb, workdir
from serve.processes import cmdline, descendants

NAME, MODULE = "registry", "loadtest.bench_registry"
TITLE = "Adapter registry at scale: registration, hot loads, disk and memory per adapter"


def parse_args(argv):
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 15.0, 5.0)
    p.add_argument("--registered", type=int, default=10_000, help="adapters registered in all")
    p.add_argument("--chunk", type=int, default=1000, help="adapters per registration chunk")
    p.add_argument("--bg-n", type=int, default=100, help="adapters in the hot loads' background traffic")
    p.add_argument("--hot", type=int, default=20, help="fresh adapters per hot-load repetition")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--capacity", type=int, default=128, help="minilm adapters_per_replica")
    a = points.finish_args(p, p.parse_args(argv))
    if a.quick:
        a.registered, a.chunk, a.bg_n, a.hot = 500, 250, 20, 4
    return a


def fillers(store, source: str, n: int) -> list[str]:
    """``n`` adapters named filler-*, hard links to ``source``'s files."""
    out = kit.names("filler", n)
    for name in out:
        d = store / name
        if d.is_dir():
            continue
        d.mkdir()
        for f in (store / source).iterdir():
            os.link(f, d / f.name)
    return out


def registry_pid(server: Server) -> int | None:
    return next((p for p in descendants(server.pid) if cmdline(p).startswith("ray::RegistryCore")), None)


def register_in_chunks(server: Server, store, names: list[str], chunk: int) -> list[dict]:
    rows = []
    for i in range(0, len(names), chunk):
        part = names[i:i + chunk]
        r = kit.register(server.base_url, store, part, BASE)
        rows.append({"registered_after": i + len(part), "calls": len(part), "seconds": r["seconds"],
                     "call_ms_p50": r["call_ms_p50"], "failed": r["failed"], "failures": r["failures"]})
        say(f"registered {i + len(part)}: chunk p50 {r['call_ms_p50']:.1f} ms, {len(part) / r['seconds']:.0f}/s, "
            f"{r['failed']} failed")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    work, started, notes = workdir(NAME), time.monotonic(), []
    store = work / "store"
    data: dict = {"args": vars(a)}
    server = None
    chunks, hot, sizes, mem = [], {}, {}, {}
    try:
        bg = kit.names("zipf", a.bg_n)
        hot_names = [n for r in range(a.reps) for k in ("idle", "busy") for n in kit.names(f"hot-{k}-{r}", a.hot)]
        data["store"] = kit.make_store(store, bg + hot_names)
        extra = fillers(store, bg[0], max(0, a.registered - a.bg_n))
        say(f"store: {len(bg) + len(hot_names)} adapters written, {len(extra)} fillers linked")
        server = service(a, work, store, split=False)
        server.start()
        notes.append(f"service healthy {server.wait_healthy(a.startup_timeout):.0f} s after start")
        reg = registry_pid(server)
        mem["before"] = {"registry": memory_mb(reg).get("VmRSS") if reg else None,
                         "routers": [memory_mb(p).get("VmRSS") for p in server.replica_pids()]}
        chunks = register_in_chunks(server, store, bg + extra, a.chunk)
        reg = registry_pid(server)
        mem["after"] = {"registry": memory_mb(reg).get("VmRSS") if reg else None,
                        "routers": [memory_mb(p).get("VmRSS") for p in server.replica_pids()]}
        state = work / "state"
        sizes = {f.name: f.stat().st_size for f in state.iterdir() if f.name.startswith("adapters.")}
        say("hot loads")
        hot = hot_loads_phase(a, server, store)
    except Exception as exc:
        notes.append(f"run FAILED: {type(exc).__name__}: {exc}")
        say(notes[-1])
    finally:
        if server is not None:
            server.stop()
    n = a.registered
    notes[:0] = [
        f"service: {report.rel(a.config)} with free ports, a temporary registry and store, {BASE} "
        f"adapters_per_replica {a.capacity}; {n} adapters registered through the admin API (4 calls in parallel) "
        f"before the hot loads: {a.bg_n} synthetic ones (copies of adapters/sentiment with seeded noise) and "
        "fillers (hard links to the first one's files, each its own registry entry)",
        f"hot loads: {a.hot} fresh adapters per repetition and condition; busy: closed loop c16 on "
        f"/v1/classify, adapters drawn from Zipf(s={a.zipf}) over the {a.bg_n} synthetic ones",
        f"whole run: {time.monotonic() - started:.0f} s"]
    data.update({"chunks": chunks, "hot": hot, "state_files": sizes, "memory_mb": mem})
    body = render(a, chunks, hot, sizes, mem)
    facts = report.machine(argv, MODULE, a.reps)
    md, js = report.write(NAME, TITLE, facts, notes, body, data, a.quick, a.output)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    return 1 if any("FAILED" in x for x in notes) else 0


def render(a, chunks: list[dict], hot: dict, sizes: dict, mem: dict) -> str:
    lines = ["### Bars", ""]
    for key in ("idle", "busy"):
        p50 = Stat.of(percentile(sorted(r["admin_ms"]), 50) for r in hot.get(key, []) if r["admin_ms"])
        if p50:
            lines.append(f"- hot-load (admin call) p50 <= 100 ms with {a.registered} registered ({key}): "
                         f"{fmt(p50)} ms -> " + ("MET" if p50.median <= 100 else "MISSED"))
    lines += ["", "### Registration through the admin API, by registry size", "",
              "| registered after the chunk | calls | call p50 ms | calls/s | failed |", "|---:|---:|---:|---:|---:|"]
    for c in chunks:
        lines.append(f"| {c['registered_after']} | {c['calls']} | {c['call_ms_p50']:.1f} | "
                     f"{c['calls'] / c['seconds']:.0f} | {c['failed']} |")
    if hot:
        lines += ["", hot_table(hot)]
    if sizes:
        total = sum(sizes.values())
        lines += ["", "### Disk and memory per registered adapter", "",
                  "State files after registering: " + ", ".join(f"`{k}` {v / 1024:.0f} KiB" for k, v in sorted(sizes.items()))
                  + f": {total / a.registered:.0f} bytes per adapter."]
    if mem.get("before") and mem.get("after"):
        b, f = mem["before"], mem["after"]
        if b["registry"] and f["registry"]:
            lines.append(f"Registry actor VmRSS {b['registry']:.0f} -> {f['registry']:.0f} MB: "
                         f"{1024 * (f['registry'] - b['registry']) / a.registered:.2f} KiB per adapter.")
        grow = [y - x for x, y in zip(b["routers"], f["routers"]) if x and y]
        if grow:
            lines.append("Router replicas VmRSS growth (each holds the registry's view): "
                         + ", ".join(f"{g:.0f} MB" for g in grow)
                         + f"; {1024 * statistics.median(grow) / a.registered:.2f} KiB per adapter (median).")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
