"""Many LoRA adapters: Zipf traffic, mixed vs grouped batches, hot loads, memory per adapter.

1. Store: ``--n-max`` synthetic rank-8 adapters on minilm (``loadtest.adapters_kit``), plus
   fresh ones for the hot loads, in a temporary folder.
2. Mixed batches (the default): ``loraserve up`` on the config (free ports, temporary registry,
   the store as its only adapter store, minilm with ``adapters_per_replica: --capacity``); all
   adapters registered through the admin API. Then closed loop at ``--concurrency`` (32), one
   sentence per request, ``POST /v1/classify`` with the adapter drawn per request from
   Zipf(s = ``--zipf``) over the first N adapters (rank 1 most popular), for N in ``--ns``,
   plus the bare base (``/v1/embeddings``). Rounds interleave the points; each point is warmed
   at c32 first (longer for an N above the capacity, so the LRUs reach their steady state);
   each N is compared with N = 1 of the same round. Adapter loads, evictions and rows per
   forward pass are deltas of the service's Prometheus counters over the window.
3. Hot loads, on the same service: for fresh adapters, ``POST /v1/load_lora_adapter`` and the
   first ``/v1/classify`` of each; idle, and under Zipf traffic (N = ``--bg-n``, c = 16).
4. Grouped batches: restart with minilm ``batching.split_by_adapter: true`` (one adapter per
   forward pass, as Ray's ``@serve.batch`` with multiplexing) on the persisted registry; N points.
5. Memory: in fresh processes without Ray, VmRSS of the torch backend per resident adapter.

Written to loadtest/results/adapters.md and .json. Usage (from the repository root):
``.venv/bin/python -m loadtest.bench_adapters [--quick] [--capacity 128] [--duration 15]``, or
``make bench-adapters``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from loadtest import adapters_kit as kit
from loadtest import metrics, points, report
from loadtest.inprocess import percentile
from loadtest.load import run_wrk, wrk_version
from loadtest.points import Target
from loadtest.report import Stat, fmt, ratios, say
from loadtest.service import Server, bench_config, memory_mb, wait_quiet, workdir
from loadtest.zipf import zipf_weights

NAME, MODULE = "adapters", "loadtest.bench_adapters"
TITLE = "LoRA adapters: many adapters (Zipf), mixed vs grouped batches, hot loads, memory"
BASE = "minilm"
METRICS_INTERVAL_MS = 2000  # RAY_metrics_report_interval_ms of the service (Ray's default: 10000)


def parse_args(argv):
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 15.0, 5.0)
    p.add_argument("--n-max", type=int, default=1000, help="adapters generated and registered")
    p.add_argument("--ns", default="1,16,100,1000", help="adapter counts N of the Zipf points")
    p.add_argument("--capacity", type=int, default=128, help="minilm adapters_per_replica")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup-max", type=float, default=20.0, help="warm-up of points with N > capacity")
    p.add_argument("--hot", type=int, default=20, help="fresh adapters per hot-load repetition")
    p.add_argument("--bg-n", type=int, default=100, help="adapters in the hot loads' background traffic")
    p.add_argument("--mem-adapters", type=int, default=128, help="adapters added in the memory probe")
    p.add_argument("--skip-grouped", action="store_true", help="no restart with split_by_adapter")
    a = points.finish_args(p, p.parse_args(argv))
    if a.quick:
        a.n_max, a.ns, a.capacity, a.hot, a.mem_adapters = 100, "1,16,100", 32, 4, 16
        a.bg_n, a.warmup_max = min(a.bg_n, 100), 3.0
    a.ns = sorted({int(n) for n in a.ns.split(",") if n.strip()})
    if not a.ns or a.ns[0] != 1 or a.ns[-1] > a.n_max or max(a.bg_n, a.mem_adapters) > a.n_max:
        p.error("--ns must start at 1 and stay <= --n-max, as must --bg-n and --mem-adapters")
    return a


class Counters:
    """Hooks around each window: settled scrapes of the service's counters before and after."""

    KEYS = ("loads_ok", "evictions", "batches", "requests_200")

    def __init__(self, url: str, quiet_s: float = METRICS_INTERVAL_MS / 1000 * 1.5 + 0.5):
        self.url, self.quiet_s = url, quiet_s

    def read(self) -> dict:
        s = metrics.scrape(self.url)
        return {"loads_ok": metrics.total(s, "ray_loraserve_adapter_loads_total", model=BASE, result="ok"),
                "evictions": metrics.total(s, "ray_loraserve_adapter_evictions_total", model=BASE),
                "batches": metrics.total(s, "ray_loraserve_batch_size_rows_count", model=BASE),
                "requests_200": metrics.total(s, "ray_loraserve_requests_total", model=BASE, status="200"),
                "load_ms": metrics.buckets(s, "ray_loraserve_adapter_load_latency_seconds", model=BASE)}

    def settled(self, min_requests: float = 0.0, max_s: float = 45.0) -> dict:
        """Scrape until the request counter reached ``min_requests`` and nothing moved for
        ``quiet_s`` (Ray exports with a delay, longer on a saturated machine)."""
        last, start = self.read(), time.monotonic()
        stable = start
        while time.monotonic() - start < max_s:
            if last["requests_200"] >= min_requests and time.monotonic() - stable >= self.quiet_s:
                return {**last, "settled": True}
            time.sleep(1.0)
            cur = self.read()
            if any(cur[k] != last[k] for k in self.KEYS):
                stable = time.monotonic()
            last = cur
        return {**last, "settled": False}

    def before(self, target):
        return self.settled()

    def after(self, target, before: dict, run: dict) -> dict:
        after = self.settled(before["requests_200"] + run["result"]["ok"])
        d = {k: after[k] - before[k] for k in self.KEYS}
        return {"counters": {**d, "settled": before["settled"] and after["settled"],
                             "rows_per_batch": d["requests_200"] / d["batches"] if d["batches"] else None,
                             "loads_per_100": 100 * d["loads_ok"] / d["requests_200"] if d["requests_200"] else None,
                             "load_ms_p50_bucket": _ms(metrics.bucket_quantile(before["load_ms"], after["load_ms"], 0.5))}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def groups(base_url: str, a, with_base: bool) -> dict[str, list[Target]]:
    out = {}
    if with_base:
        out["base"] = [Target("base (embeddings)", base_url + "/v1/embeddings",
                              [points.body(BASE, kit.SENTENCE)], a.concurrency)]
    for n in a.ns:
        bodies = [points.body(name, [kit.SENTENCE]) for name in kit.names("zipf", n)]
        out[f"N={n}"] = [Target(f"N={n}", base_url + "/v1/classify", bodies, a.concurrency,
                                weights=zipf_weights(n, a.zipf), seed=1000 + n)]
    return out


def service(a, work, store, split: bool) -> Server:
    cfg = bench_config(a.config, work / "state", app={"adapters": {"stores": [str(store)], "preload": []}},
                       model={"adapters": {"adapters_per_replica": a.capacity, "max_rank": 64},
                              "batching": {"split_by_adapter": split}}, model_id=BASE)
    name = "grouped" if split else "mixed"
    return Server.loraserve(name, cfg, work, env={"RAY_metrics_report_interval_ms": str(METRICS_INTERVAL_MS)})


def throughput(a, server: Server, with_base: bool) -> dict:
    warm = {f"N={n}": (a.warmup_max if n > a.capacity else a.warmup) for n in a.ns}
    warm["base"] = a.warmup
    runs = points.rounds(groups(server.base_url, a, with_base), a.reps, warm, a.duration,
                         lambda _: server, a.wait_quiet, Counters(server.metrics_url))
    out = {label: points.summary(r) for label, r in runs.items()}
    n1 = [r["result"]["rps"] for r in runs["N=1"]]
    for label, s in out.items():
        s["vs_n1"] = ratios([r["result"]["rps"] for r in s["runs"]], n1) if label.startswith("N=") else None
        c = [r["counters"] for r in s["runs"]]
        s["loads_per_100"] = Stat.of(x["loads_per_100"] for x in c)
        s["rows_per_batch"] = Stat.of(x["rows_per_batch"] for x in c)
        s["evictions"] = Stat.of(x["evictions"] for x in c)
        s["load_ms_bucket"] = Stat.of(x["load_ms_p50_bucket"] for x in c)
        s["settled"] = all(x["settled"] for x in c)
    return out


def hot_phase(a, server: Server, store) -> dict:
    out: dict = {"idle": [], "busy": []}
    bg_bodies = [points.body(n, [kit.SENTENCE]) for n in kit.names("zipf", a.bg_n)]
    for rep in range(a.reps):
        wait_quiet(a.wait_quiet, say)
        out["idle"].append(kit.hot_loads(server.base_url, store, kit.names(f"hot-idle-{rep}", a.hot),
                                         BASE, 0.25))
        bg: dict = {}

        def background(seed: int, seconds: float, into: dict) -> None:
            into["r"] = run_wrk(server.base_url + "/v1/classify", bg_bodies, 16, seconds,
                                weights=zipf_weights(a.bg_n, a.zipf), seed=seed)

        t = threading.Thread(target=background, args=(77 + rep, a.hot * 0.8 + 8, bg))
        t.start()
        time.sleep(3.0)
        busy = kit.hot_loads(server.base_url, store, kit.names(f"hot-busy-{rep}", a.hot), BASE, 0.25)
        t.join()
        busy["background"] = bg["r"].as_dict() if "r" in bg else None
        out["busy"].append(busy)
        say(f"hot loads {rep + 1}/{a.reps}: idle p50 {percentile(sorted(out['idle'][-1]['total_ms']), 50):.0f} ms, "
            f"busy p50 {percentile(sorted(busy['total_ms']), 50):.0f} ms")
    return out


def run_memory(a, store) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    res = []
    for _ in range(a.reps):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            res.append(pool.submit(kit.memory_child, a.config, BASE, str(store),
                                   kit.names("zipf", a.mem_adapters), max(256, a.mem_adapters)).result())
    return res


# -- report ----------------------------------------------------------------------------------------
def throughput_table(title: str, res: dict) -> str:
    lines = [f"### {title}", "", "| point | req/s | vs N=1 (same round) | p50 ms | p99 ms | errors "
             "| adapter loads per 100 req | evictions | load ms p50 (bucket) | rows per forward pass "
             "| wrk CPU | other cores (max) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in res.items():
        lines.append(f"| {label} | {fmt(s['rps'])} | {fmt(s['vs_n1'], 2, 'x')} | {fmt(s['p50_ms'], 1)} | "
                     f"{fmt(s['p99_ms'], 1)} | {sum(s['errors'].values())} | {fmt(s['loads_per_100'], 2)} | "
                     f"{fmt(s['evictions'], 0)} | {fmt(s['load_ms_bucket'], 0)} | {fmt(s['rows_per_batch'], 1)}"
                     f"{'' if s['settled'] else ' (?)'} | {100 * s['client_cpu_share'].median:.1f}% | "
                     f"{s['other_cores_max']:.2f} |")
    if not all(s["settled"] for s in res.values()):
        lines.append("\n(?) Ray's exported counters had not caught up within 45 s around a window.")
    return "\n".join(lines)


def hot_table(hot: dict) -> str:
    lines = ["### Hot load: POST /v1/load_lora_adapter, then the first /v1/classify of it", "",
             "| condition | ok | load + first classify p50 ms | p99 ms | admin call p50 ms | first classify p50 ms "
             "| background req/s | client CPU (% of a core): probes / background wrk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("idle", "busy"):
        reps = hot.get(key) or []
        if not reps:
            continue

        def stat(field: str, q: float, reps=reps) -> Stat | None:
            return Stat.of(percentile(sorted(r[field]), q) for r in reps if r[field])

        bg = Stat.of(r["background"]["rps"] for r in reps if r.get("background"))
        probe_cpu = Stat.of(100 * r["client_cpu_share"] for r in reps)
        bg_cpu = Stat.of(100 * r["background"]["client_cpu_share"] for r in reps if r.get("background"))
        lines.append(f"| {key} | {sum(r['ok'] for r in reps)}/{sum(r['n'] for r in reps)} | "
                     f"{fmt(stat('total_ms', 50))} | {fmt(stat('total_ms', 99))} | {fmt(stat('admin_ms', 50))} | "
                     f"{fmt(stat('first_classify_ms', 50))} | {fmt(bg)} | {fmt(probe_cpu)}% / "
                     f"{'-' if bg_cpu is None else fmt(bg_cpu) + '%'} |")
    return "\n".join(lines)


def memory_text(mem: list[dict], rss: dict) -> str:
    if not mem:
        return ""
    per = Stat.of(m["mb_per_adapter"] for m in mem)
    marginal = Stat.of(m["mb_per_adapter_after_first"] for m in mem)
    m = mem[0]
    lines = ["### Memory per resident adapter", "",
             f"In process (torch backend, no Ray), {m['adapters']} adapters of {m['file_mb']:.2f} MB "
             f"files, `adapters_per_replica: {m['capacity']}`: VmRSS grows {fmt(per, 2)} MB per "
             f"adapter ({fmt(marginal, 2)} MB after the first, which allocates the slot stacks); "
             f"add_adapter p50 {fmt(Stat.of(x['add_ms_p50'] for x in mem))} ms.", ""]
    if rss:
        lines += ["Router replica processes of the mixed service (VmRSS MB): " + "; ".join(
            f"{when}: " + ", ".join(f"{v.get('VmRSS', 0):.0f}" for v in found.values())
            for when, found in rss.items())]
    return "\n".join(lines)


def bars(mixed: dict, hot: dict) -> str:
    lines = ["### Bars", ""]
    for n, bar in ((100, 0.85), (1000, 0.60)):
        s = mixed.get(f"N={n}")
        if s and s["vs_n1"]:
            lines.append(f"- N={n} throughput >= {bar:.2f}x of N=1 (mixed): {fmt(s['vs_n1'], 2, 'x')} -> "
                         + ("MET" if s["vs_n1"].median >= bar else "MISSED"))
    for key in ("idle", "busy"):
        p50 = Stat.of(percentile(sorted(r["total_ms"]), 50) for r in hot.get(key, []) if r["total_ms"])
        if p50:
            lines.append(f"- hot load p50 <= 100 ms ({key}): {fmt(p50)} ms -> "
                         + ("MET" if p50.median <= 100 else "MISSED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    work, started, notes = workdir(NAME), time.monotonic(), []
    store = work / "store"
    data: dict = {"args": vars(a)}
    mixed, grouped, hot, mem, rss = {}, {}, {}, [], {}
    server = None
    try:
        hot_names = [n for r in range(a.reps) for k in ("idle", "busy") for n in kit.names(f"hot-{k}-{r}", a.hot)]
        data["store"] = kit.make_store(store, kit.names("zipf", a.n_max) + hot_names)
        say(f"store: {data['store']['written']} adapters written")
        server = service(a, work, store, split=False)
        say(f"starting the service, mixed batches (log: {report.rel(server.log_path)})")
        server.start()
        notes.append(f"mixed service healthy {server.wait_healthy(a.startup_timeout):.0f} s after start")
        rss["after start"] = {p: memory_mb(p) for p in server.replica_pids()}
        data["registration"] = kit.register(server.base_url, store, kit.names("zipf", a.n_max), BASE)
        say(f"registered {data['registration']['registered']} adapters in {data['registration']['seconds']:.0f} s")
        conn = kit.Conn(server.base_url)
        probs = [kit.classify(conn, n)[1]["data"][0]["probs"] for n in kit.names("zipf", 3)]
        differ = all(max(abs(x - y) for x, y in zip(probs[i], probs[j])) > 1e-4 for i in range(3) for j in range(i))
        notes.append(f"outputs differ per adapter (first 3, same sentence): {differ}")
        mixed = throughput(a, server, with_base=True)
        rss[f"after the N={a.ns[-1]} points"] = {p: memory_mb(p) for p in server.replica_pids()}
        say("hot loads")
        hot = hot_phase(a, server, store)
        server.stop()
        if not a.skip_grouped:
            server = service(a, work, store, split=True)
            say("starting the service, grouped batches (split_by_adapter)")
            server.start()
            notes.append(f"grouped service healthy {server.wait_healthy(a.startup_timeout):.0f} s after start "
                         "(adapters from the persisted registry)")
            grouped = throughput(a, server, with_base=False)
            server.stop()
        say("memory probe")
        mem = run_memory(a, store)
    except Exception as exc:
        notes.append(f"run FAILED: {type(exc).__name__}: {exc}")
        say(notes[-1])
    finally:
        if server is not None:
            server.stop()
    notes[:0] = [
        f"workload: closed loop at c{a.concurrency}, one sentence per request; POST /v1/classify with the "
        f"adapter drawn per request from Zipf(s={a.zipf}) over the first N of {a.n_max} registered adapters "
        f"(rank 1 most popular); {a.warmup:g} s warm-up ({a.warmup_max:g} s for N > {a.capacity}), then "
        f"{a.duration:g} s per point; rounds interleave the points",
        f"service: {report.rel(a.config)} with free ports, a temporary registry and store, {BASE} "
        f"adapters_per_replica {a.capacity}, max_rank 64; RAY_metrics_report_interval_ms={METRICS_INTERVAL_MS}",
        f"adapters: copies of adapters/sentiment with seeded random tensors (LoRA ~ N(0, {kit.LORA_STD}), "
        f"head ~ N(0, {kit.HEAD_STD})); hot loads: {a.hot} fresh adapters per repetition and condition",
        f"whole run: {time.monotonic() - started:.0f} s"]
    sections = [bars(mixed, hot)] if mixed else []
    if mixed:
        sections.append(throughput_table("Throughput, mixed batches (default)", mixed))
    if grouped:
        sections.append(throughput_table("Throughput, grouped batches (split_by_adapter: true)", grouped))
        sections.append("grouped / mixed req/s (median over median): " + "; ".join(
            f"{k}: {fmt(report.ratio(grouped[k]['rps'], mixed[k]['rps']), 2, 'x')}"
            for k in grouped if k in mixed))
    if hot:
        sections.append(hot_table(hot))
    sections.append(memory_text(mem, rss))
    problems = [n for n in notes if "FAILED" in n]
    if problems:
        sections.append("Problems:\n" + "\n".join(f"- {n}" for n in problems))
    body = "\n\n".join(s for s in sections if s)
    data.update(mixed=mixed, grouped=grouped, hot=hot, memory=mem, router_rss=rss)
    facts = report.machine(argv, MODULE, a.reps, {"wrk": wrk_version()})
    md, js = report.write(NAME, TITLE, facts, notes, body, data, a.quick, a.output)
    if problems:
        say(f"logs kept in {work}")
        shutil.rmtree(store, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    errors = any(sum(s["errors"].values()) for s in [*mixed.values(), *grouped.values()])
    hot_fail = any(r["failures"] for k in ("idle", "busy") for r in hot.get(k, []))
    return 1 if problems or errors or hot_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
