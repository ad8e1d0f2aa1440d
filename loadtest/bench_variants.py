"""ONNX variants vs torch on one base: in process, their ceilings, and served, in one run.

Variants torch, onnx (fp32) and onnx-int8 of the config's model (``--model``, minilm); the ONNX
files are the project's own, from the config's variant cache (built first when missing). Steps,
one after another so nothing competes for the cores:

1. In process, one spawned process with the three backends as a replica loads them (the
   config's thread counts; the config's preloaded adapters added). Cases: one short sentence,
   ``max_batch_size`` short sentences, ``--long-batch`` inputs of ``--long-tokens`` tokens;
   each without adapters, with every row on the first adapter, and mixed (rows cycle over the
   adapters and the bare base). Rows are tokenized beforehand: ``predict`` alone is timed.
   Reported: sentences/s, ms per batch and achieved GFLOP/s (FLOPs of the padded batch, from
   the model's config.json), against a single-thread sgemm (``torch.mm``) measured around it.
2. Ceilings: per variant, the in-process ceiling in the service's layout and one sentence in
   one process (``loadtest.inprocess``).
3. Served: ``loraserve up`` on the config (free ports, temporary registry), started once. Per
   variant: embeddings of one short sentence at c32 and c1, classify with the first preloaded
   adapter at c32 and c1, long inputs at ``--long-concurrency``. Rounds interleave the variants
   (each warmed at c32 first); ratios to torch are per round, then the median.

Written to loadtest/results/variants.md and .json. Usage (from the repository root):
``.venv/bin/python -m loadtest.bench_variants [--quick] [--steps inprocess,ceiling,served]``,
or ``make bench-variants``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from loadtest import inprocess, points, report
from loadtest.load import wrk_version
from loadtest.points import Target
from loadtest.report import Stat, fmt, ratio, ratios, say
from loadtest.service import BUSY, OtherLoad, Server, bench_config, wait_quiet, workdir

NAME, MODULE = "variants", "loadtest.bench_variants"
TITLE = "ONNX variants vs torch: in process, ceilings and served"
SENTENCE = "The quick brown fox jumps over the lazy dog."
LONG_WORDS = ("the city council met on monday to discuss the new budget for public schools and "
              "roads . many people came to the meeting because they were worried about the cost "
              "of the plan and what it would mean for their families .").split()
VARIANTS = ("torch", "onnx", "onnx-int8")
STEPS = ("inprocess", "ceiling", "served")


def parse_args(argv):
    p = points.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), 10.0, 4.0)
    p.add_argument("--model", default="minilm", help="catalog id of the base measured")
    p.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    p.add_argument("--inprocess-duration", type=float, default=3.0, help="seconds per in-process point")
    p.add_argument("--long-tokens", type=int, default=128, help="tokens of a long input (incl. special)")
    p.add_argument("--long-batch", type=int, default=8)
    p.add_argument("--long-concurrency", type=int, default=8)
    a = points.finish_args(p, p.parse_args(argv))
    if a.quick:
        a.inprocess_duration = min(a.inprocess_duration, 0.5)
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    if set(a.steps) - set(STEPS):
        p.error(f"--steps: choose from {','.join(STEPS)}")
    return a


def long_text(model_dir, tokens: int) -> tuple[str, int]:
    """Words repeated until ``tokens`` tokens including the special ones (or just under)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    best, n = "", 0
    for k in range(1, 4 * tokens):
        text = " ".join((LONG_WORDS * (k // len(LONG_WORDS) + 1))[:k])
        count = len(tok.encode(text).ids)
        if count > tokens:
            break
        best, n = text, count
    return best, n


def flops_per_seq(cfg: dict, n: int) -> float:
    """2 FLOPs per multiply-add of the linear layers + the attention products (QK^T, AV) for a
    sequence of ``n`` padded tokens; embeddings, norms, softmax, GELU, LoRA not counted."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return layers * (2.0 * n * (4 * h * h + 2 * h * i) + 4.0 * n * n * h)


# -- 1. in process (runs in a spawned child) -------------------------------------------------------
def sgemm_gflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.mm(a, b)
    best = min(inprocess.loop(lambda: torch.mm(a, b, out=c), 0.0, reps)[0])
    return 2.0 * n ** 3 / best / 1e9


def inprocess_child(config: str, model_id: str, long: str, long_batch: int, seconds: float,
                    reps: int) -> dict:
    backends = {v: inprocess.replica_backend(config, model_id, v) for v in VARIANTS}
    names = backends["torch"][1]
    batch = backends["torch"][0].spec.batching.max_batch_size
    cfg = json.loads((backends["torch"][0].path / "config.json").read_text())
    out = {"sgemm_gflops": [sgemm_gflops()], "adapters": names, "points": []}
    cases = [("short", 1, SENTENCE), ("short", batch, SENTENCE), ("long", long_batch, long)]
    modes = [("none", None)] + ([(names[0], "first"), ("mixed", "mixed")] if names else [])
    for rep in range(reps):
        for kind, n, text in cases:
            for mode, how in modes:
                if how == "mixed" and n == 1:
                    continue
                cycle = [*names, None]
                plan = None if how is None else (
                    [names[0]] * n if how == "first" else [cycle[i % len(cycle)] for i in range(n)])
                for variant in VARIANTS:
                    b = backends[variant][0]
                    rows = b.encode([text] * n)
                    other = OtherLoad(os.getppid()).start()
                    step = functools.partial(b.predict, rows, plan)
                    inprocess.loop(step, min(0.3, seconds))
                    lat, elapsed, cpu = inprocess.loop(step, seconds, 3)
                    padded = max(len(r) for r in rows)
                    out["points"].append({
                        "case": kind, "batch": n, "tokens": padded, "adapters": mode,
                        "variant": variant, "rep": rep, "sentences_per_s": n * len(lat) / elapsed,
                        "ms_per_batch": 1000 * sorted(lat)[len(lat) // 2],
                        "gflops": n * flops_per_seq(cfg, padded) * len(lat) / elapsed / 1e9,
                        "cores": cpu / elapsed, "other_cores": other.stop()})
    out["sgemm_gflops"].append(sgemm_gflops())
    for b, _ in backends.values():
        b.close()
    return out


def run_inprocess(a, long: str) -> dict:
    inprocess.prepare(a.config)
    with inprocess.replica_env(), ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(inprocess_child, a.config, a.model, long, a.long_batch,
                          a.inprocess_duration, a.reps)
    return job.result()


def inprocess_table(res: dict) -> str:
    peak = Stat.of(res["sgemm_gflops"])
    keys = []
    for p in res["points"]:
        k = (p["case"], p["batch"], p["adapters"])
        if k not in keys:
            keys.append(k)
    lines = ["## In process: the backends alone (a replica's threads), predict only", "",
             f"sgemm (torch.mm 2048x2048 fp32, 1 thread) before and after: {fmt(peak)} GFLOP/s. "
             f"Adapters: {', '.join(res['adapters']) or 'none'}; `mixed` cycles over them and the "
             "bare base.", "",
             "| case | batch x tokens | adapters | " + " | ".join(
                 f"{v}: sentences/s (GFLOP/s, % of sgemm)" for v in VARIANTS) + " | onnx-int8 vs torch |",
             "|---|---:|---|" + "---:|" * (len(VARIANTS) + 1)]
    disturbed = max((p["other_cores"] for p in res["points"]), default=0.0)
    for case, n, mode in keys:
        cells, rps = [], {}
        for v in VARIANTS:
            pts = [p for p in res["points"] if (p["case"], p["batch"], p["adapters"], p["variant"])
                   == (case, n, mode, v)]
            rps[v] = [p["sentences_per_s"] for p in pts]
            g = Stat.of(p["gflops"] for p in pts)
            cells.append(f"{fmt(Stat.of(rps[v]))} ({fmt(g)}, "
                         f"{100 * g.median / peak.median:.0f}%)" if g and peak else "n/a")
        tokens = next(p["tokens"] for p in res["points"] if (p["case"], p["batch"]) == (case, n))
        lines.append(f"| {case} | {n} x {tokens} | {mode} | " + " | ".join(cells)
                     + f" | {fmt(ratios(rps['onnx-int8'], rps['torch']), 2, 'x')} |")
    lines += ["", "GFLOP/s: 2 per multiply-add of the linear layers plus the attention products, "
              "for the padded batch; int8 multiply-adds count as FLOP-equivalents, so int8 can pass "
              "the fp32 sgemm figure; how much int8 gains depends on the ISA line above (VNNI, AMX)."]
    if disturbed > BUSY:
        lines.append(f"(!) other processes used up to {disturbed:.2f} cores during these points")
    return "\n".join(lines)


# -- 2. ceilings ---------------------------------------------------------------------------------------
def run_ceilings(a, spec, replicas: int, notes: list[str]) -> dict:
    out: dict = {}
    for variant in VARIANTS:
        for key, procs, size in (("ceiling", replicas, spec.batching.max_batch_size), ("one", 1, 1)):
            wait_quiet(a.wait_quiet, say)
            say(f"in process {variant}: {procs} process(es) x batches of {size}")
            try:
                reps = inprocess.ceiling(a.config, variant, procs, size, SENTENCE, a.warmup,
                                         a.duration, a.reps, spec.id)
            except Exception as exc:
                notes.append(f"{key} {variant} FAILED: {type(exc).__name__}: {exc}")
                say(notes[-1])
                continue
            out[f"{key} {variant}"] = {"reps": reps, "rps": Stat.of(r["rps"] for r in reps),
                                       "p50_ms": Stat.of(r["p50_ms"] for r in reps),
                                       "other_cores_max": max(r["other_cores"] for r in reps)}
    return out


# -- 3. served ---------------------------------------------------------------------------------------
def served_groups(base_url: str, spec, adapters: list[str], long: str, a) -> dict[str, list[Target]]:
    groups = {}
    for v in VARIANTS:
        emb = spec.id if v == spec.default_variant else f"{spec.id}@{v}"
        ts = [Target(f"{v} embeddings c{c}", base_url + "/v1/embeddings",
                     [points.body(emb, SENTENCE)], c) for c in (32, 1)]
        if adapters:
            cls = adapters[0] if v == spec.default_variant else f"{adapters[0]}@{v}"
            ts += [Target(f"{v} classify c{c}", base_url + "/v1/classify",
                          [points.body(cls, SENTENCE)], c) for c in (32, 1)]
        ts.append(Target(f"{v} long c{a.long_concurrency}", base_url + "/v1/embeddings",
                         [points.body(emb, long)], a.long_concurrency))
        groups[v] = ts
    return groups


def run_served(a, spec, adapters, long, work, notes) -> dict:
    server = Server.loraserve("service", bench_config(a.config, work / "state"), work)
    try:
        say(f"starting the service (log: {report.rel(server.log_path)})")
        server.start()
        notes.append(f"service: healthy {server.wait_healthy(a.startup_timeout):.0f} s after start")
        groups = served_groups(server.base_url, spec, adapters, long, a)
        runs = points.rounds(groups, a.reps, a.warmup, a.duration, lambda _: server, a.wait_quiet)
        return {label: points.summary(r) for label, r in runs.items()}
    except Exception as exc:
        notes.append(f"served FAILED: {type(exc).__name__}: {exc}")
        say(notes[-1])
        return {}
    finally:
        server.stop()


def served_section(served: dict, ceil: dict, a) -> str:
    def rps_list(label):
        return [r["result"]["rps"] for r in served[label]["runs"]] if label in served else []

    key = ratios(rps_list("onnx-int8 embeddings c32"), rps_list("torch embeddings c32"))
    lines = ["## Key number", "", f"**served onnx-int8 / torch at c32, one short sentence per "
             f"request: {fmt(key, 2, 'x')}** (per-round ratios; target >= 2x)", "",
             "## Served (HTTP through `loraserve up`) and the ceilings", "", points.TABLE_HEAD]
    for label, s in served.items():
        lines.append(points.table_row(label.rsplit(" c", 1)[0], s["runs"][0]["result"]["concurrency"], s))
    lines += ["", "| variant | served c32 req/s | ceiling sentences/s | served / ceiling | served c32 vs "
              "torch | served c1 p50 ms | one sentence in process p50 ms | classify c32 vs torch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        s32, s1 = served.get(f"{v} embeddings c32"), served.get(f"{v} embeddings c1")
        c, one = ceil.get(f"ceiling {v}"), ceil.get(f"one {v}")
        vs = ratios(rps_list(f"{v} embeddings c32"), rps_list("torch embeddings c32"))
        cls = ratios(rps_list(f"{v} classify c32"), rps_list("torch classify c32"))
        lines.append(f"| {v} | {fmt(s32 and s32['rps'])} | {fmt(c and c['rps'])} | "
                     f"{fmt(ratio(s32 and s32['rps'], c and c['rps']), 2, 'x')} | {fmt(vs, 2, 'x')} | "
                     f"{fmt(s1 and s1['p50_ms'], 2)} | {fmt(one and one['p50_ms'], 2)} | {fmt(cls, 2, 'x')} |")
    other = max([s["other_cores_max"] for s in served.values()]
                + [c["other_cores_max"] for c in ceil.values()] or [0.0])
    if other > BUSY:
        lines += ["", points.disturbed_note(served) or f"(!) other processes used up to {other:.2f} "
                  "cores during the ceilings"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    from models import resolve_source
    from serve.settings import load_config, load_settings, replica_bounds

    settings = load_settings(a.config)
    spec = inprocess.model_spec(settings, a.model)
    if set(VARIANTS) - set(spec.variants):
        raise SystemExit(f"{spec.id} does not serve all of {VARIANTS} in {a.config}")
    adapters = [x.name for x in settings.adapters.preload if x.base == spec.id]
    long, long_tokens = long_text(resolve_source(spec.source), a.long_tokens)
    replicas, work, started = replica_bounds(load_config(a.config))[1], workdir(NAME), time.monotonic()
    notes = [f"model {spec.id} ({spec.hub_id or spec.source}); torch_threads {spec.torch_threads}, "
             f"onnx threads {spec.onnx.threads}; adapters {', '.join(adapters) or 'none'}",
             f"inputs: short = {SENTENCE!r}; long = {long_tokens} tokens incl. special tokens",
             f"served: {report.rel(a.config)} with free ports, temporary registry; rounds interleave "
             f"the variants, each warmed {a.warmup:g} s at c32, then {a.duration:g} s per point",
             f"ceiling: {replicas} processes (the Router's max_replicas) x batches of "
             f"{spec.batching.max_batch_size}, loaded as a replica loads the variant; one = one "
             "sentence at a time in one such process"]
    data: dict = {"args": vars(a)}
    sections = []
    if "inprocess" in a.steps:
        wait_quiet(a.wait_quiet, say)
        say("in process: three backends in a spawned child")
        try:
            data["inprocess"] = run_inprocess(a, long)
            sections.append(inprocess_table(data["inprocess"]))
        except Exception as exc:
            notes.append(f"in-process FAILED: {type(exc).__name__}: {exc}")
            say(notes[-1])
    ceil = run_ceilings(a, spec, replicas, notes) if "ceiling" in a.steps else {}
    served = run_served(a, spec, adapters, long, work, notes) if "served" in a.steps else {}
    data.update(ceilings=ceil, served=served)
    if served or ceil:
        sections.insert(0, served_section(served, ceil, a))
    notes.append(f"whole run: {time.monotonic() - started:.0f} s")
    problems = [n for n in notes if "FAILED" in n]
    body = "\n\n".join(sections + (["Problems:\n" + "\n".join(f"- {n}" for n in problems)]
                                   if problems else []))
    facts = report.machine(argv, MODULE, a.reps, {"wrk": wrk_version()})
    md, js = report.write(NAME, TITLE, facts, notes, body, data, a.quick, a.output)
    if problems:
        say(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    key = next((line for line in body.splitlines() if line.startswith("**served onnx-int8")), "")
    if key:
        say(key.replace("**", ""))
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    errors = any(sum(s["errors"].values()) for s in served.values())
    return 1 if problems or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
