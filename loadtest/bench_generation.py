"""Generation throughput and latency: one ``generate`` per request, static batches, our continuous
batching and transformers' own, at several concurrencies, with 1 adapter and with 8.

    .venv/bin/python -m loadtest.bench_generation            # about 30 minutes on 2 cores
    .venv/bin/python -m loadtest.bench_generation --quick    # smoke run

In process, one Python process with ``--threads`` torch threads (the machine's cores), so the
four engines get the same CPU; closed loop: ``c`` client threads each send a request, wait for
its last token, and send the next. Every request is a chat prompt for the default base
(``storyteller``) asking for a short story, greedy, at most ``--max-tokens`` tokens: all engines
compute the same tokens. Figures per (engine, adapters, concurrency): output tokens per second,
time to first token (TTFT) p50 and p99 from submission, time per output token (TPOT, per
request: time after its first token over the tokens after it) p50; median of ``--reps``
repetitions with the spread. Adapters: 8 LoRA adapters (rank 8, q/k/v/o) with seeded random
weights; the 8-adapter runs give each request the next adapter in turn.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadtest import report
from loadtest.report import Stat, fmt, ratios, say

NAME, MODULE = "generation", "loadtest.bench_generation"
TITLE = "Generation: continuous batching across adapters against the usual recipes (in process)"
ENGINES = ("per_request", "static", "continuous", "hf_continuous")  # the default set
CHOICES = ENGINES + ("continuous_nocache",)
LABELS = {"per_request": "one generate per request", "static": "static batches",
          "continuous": "continuous batching (ours)", "hf_continuous": "transformers continuous batching",
          "continuous_nocache": "ours, prefix cache off"}


PROBES: list[list[int]] = []  # prompts the transformers engine must get right first (set in main)


def make_adapters(base: Path, root: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.05)
        model.save_pretrained(root / f"a{i}", safe_serialization=True)
        names.append(f"a{i}")
    return names


STORYTELLER = "package:models.generative.storyteller"


# words the default base was trained on (its corpus, models/generative/corpus.py)
ANIMALS = ["cat", "dog", "rabbit", "fox", "bear", "duck", "mouse", "owl", "frog", "pig", "horse", "bird"]
NAMES = ["Mia", "Tom", "Lily", "Ben", "Zoe", "Max", "Anna", "Leo", "Sara", "Sam", "Ella", "Finn", "Nora",
         "Jack", "Ruby", "Owen", "Ivy", "Noah", "Lucy", "Theo"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` different chat prompts (up to 480), in a seeded order: no prompt is sent twice, so our
    engine's prefix cache can reuse only what real prompts share (the chat template and the first
    words of the ask), never a whole repeated prompt. The animals and names are the ones the
    default base was trained on; "named" and "called" asks get stories of the same length."""
    asks = [f"Write a short story about a {a} {verb} {who}." for a in ANIMALS for who in NAMES
            for verb in ("named", "called")]
    if n > len(asks):
        raise ValueError(f"{n} prompts asked for, {len(asks)} different ones exist: fewer --per-client")
    random.Random(0).shuffle(asks)
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True,
                                               tokenize=True)) for ask in asks[:n]]


def build(kind: str, base: Path, store: Path, names: list[str], mixed: bool, max_tokens: int,
          step_tokens: int | None = None):
    """The engine of ``kind``; ``mixed``: 8 adapters unmerged, else adapter a0 (merged, except ours)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loadtest import gen_engines as g

    if kind.startswith("continuous"):
        from models import ModelSpec, base_weight_shapes, create_backend, validate_adapter

        gen = {"max_running": 32, **({"step_tokens": step_tokens} if step_tokens else {}),
               **({"prefix_cache_mb": 0} if kind == "continuous_nocache" else {})}
        spec = ModelSpec(id="storyteller", source=str(base), task="generate", generation=gen)
        b = create_backend(spec, "torch")
        b.load()
        for n in names if mixed else names[:1]:
            check = validate_adapter(n, [store], base_shapes=base_weight_shapes(base), task="generate", max_rank=64)
            b.add_adapter(n, check, "generate")
        return g.Continuous(b)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    if mixed:
        model = PeftModel.from_pretrained(model, store / names[0], adapter_name=names[0]).eval()
        for n in names[1:]:
            model.load_adapter(store / n, adapter_name=n)
    else:
        model = PeftModel.from_pretrained(model, store / names[0]).merge_and_unload().eval()
    if kind == "per_request":
        return g.PerRequest(model, eos, pad, mixed)
    if kind == "static":
        return g.StaticBatch(model, eos, pad, mixed)
    if mixed:
        raise NotImplementedError("transformers' continuous batching has no per-request adapter")
    problem = g.hf_continuous_problem(model, eos, pad, PROBES)
    if problem:
        raise NotImplementedError(problem)
    return g.HFContinuous(model, eos, pad, max_tokens)


def closed_loop(engine, reqs: list, concurrency: int) -> dict:
    """``concurrency`` clients share ``reqs`` in order, one request at a time each. Each client's
    first request is warm-up, not counted: the clients all start in the same millisecond, a burst
    no steady load has; figures cover the requests sent after it."""
    it = iter(reqs)
    lock = threading.Lock()
    counted = []

    def client():
        first = True
        while True:
            with lock:
                r = next(it, None)
            if r is None:
                return
            r.t_submit = time.perf_counter()
            engine.submit(r)
            if not r.done.wait(600):
                raise TimeoutError("a request did not finish in 600 s")
            if not first:
                counted.append(r)
            first = False

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    ticks = report.cpu_ticks()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steal = report.steal_pct(ticks, report.cpu_ticks())
    wall = max(r.t_end for r in counted) - min(r.t_submit for r in counted)
    ttft = sorted((r.t_first - r.t_submit) * 1000 for r in counted if r.t_first is not None)
    tpot = sorted((r.t_end - r.t_first) * 1000 / (r.tokens - 1) for r in counted if r.tokens > 1)
    pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"tokens_per_s": sum(r.tokens for r in counted) / wall, "ttft_p50_ms": pick(ttft, 0.5),
            "ttft_p99_ms": pick(ttft, 0.99), "tpot_p50_ms": pick(tpot, 0.5), "requests": len(counted),
            "steal_pct": steal,
            "tokens": sum(r.tokens for r in counted)}


def run_point(engine, pool, concurrency: int, per_client: int, names: list[str], mixed: bool, max_tokens: int):
    """``pool``: an iterator of prompts (each used once in a worker)."""
    from loadtest.gen_engines import Req

    n = concurrency * (per_client + 1)  # + each client's warm-up request
    reqs = [Req(next(pool), names[i % len(names)] if mixed else names[0], max_tokens) for i in range(n)]
    return closed_loop(engine, reqs, concurrency)


def worker(a) -> dict:
    """One (engine, adapters) case in this fresh process: every concurrency level, as JSON."""
    import torch
    from transformers import AutoTokenizer

    from models import resolve_source

    torch.set_num_threads(a.threads)
    base, store = resolve_source(STORYTELLER), Path(a.store)
    names = sorted(p.name for p in store.iterdir())
    levels = [int(x) for x in a.concurrency.split(",")]
    every = prompts(AutoTokenizer.from_pretrained(base), 4 + sum(c * (a.per_client + 1) for c in levels))
    PROBES[:] = every[:2]
    pool = iter(every)
    try:
        engine = build(a.worker, base, store, names, a.mixed, a.max_tokens, a.step_tokens).start()
    except Exception as exc:  # recorded: why this engine cannot run this case
        return {"skipped": f"{type(exc).__name__}: {exc}"[:500]}
    out = {}
    try:
        run_point(engine, pool, 2, 1, names, a.mixed, a.max_tokens)  # warm-up
        for c in levels:
            out[str(c)] = run_point(engine, pool, c, a.per_client, names, a.mixed, a.max_tokens)
    finally:
        engine.stop()
    return {"levels": out}


def main(argv: list[str] | None = None) -> int:
    import json
    import subprocess

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--per-client", type=int, default=4, help="counted requests per client thread per figure")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--step-tokens", type=int, default=None, help="ours: generation.step_tokens (default: the spec's)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=None)
    p.add_argument("--worker", choices=CHOICES, help=argparse.SUPPRESS)
    p.add_argument("--mixed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--make-adapters", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.make_adapters:
        from models import resolve_source

        make_adapters(resolve_source(STORYTELLER), Path(a.make_adapters), 8)
        return 0
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    if a.quick:
        a.reps, a.per_client, a.concurrency = 1, 1, "1,8"
    elif a.reps < 3:
        p.error("--reps must be >= 3; use --quick for a smoke run")
    levels = [int(c) for c in a.concurrency.split(",")]
    engines = [e for e in a.engines.split(",") if e]
    results: dict = {}
    skipped: dict[str, str] = {}
    child = [sys.executable, "-m", MODULE, "--threads", str(a.threads), "--concurrency", a.concurrency,
             "--per-client", str(a.per_client), "--max-tokens", str(a.max_tokens),
             *(["--step-tokens", str(a.step_tokens)] if a.step_tokens else [])]
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        subprocess.run([*child, "--make-adapters", tmp], check=True)
        for rep in range(a.reps):
            for mixed in (False, True):
                for kind in engines if rep % 2 == 0 else engines[::-1]:
                    key = f"{kind}/{'8' if mixed else '1'}"
                    run = subprocess.run([*child, "--worker", kind, "--store", tmp, *(["--mixed"] * mixed)],
                                         capture_output=True, text=True, check=True)
                    got = json.loads(run.stdout.strip().splitlines()[-1])
                    if "skipped" in got:
                        skipped[key] = got["skipped"]
                        continue
                    for c, point in got["levels"].items():
                        results.setdefault(key, {}).setdefault(c, []).append(point)
                        say(f"rep {rep + 1} {key} c{c}: {point['tokens_per_s']:.0f} tok/s, "
                            f"TTFT p50 {point['ttft_p50_ms']:.1f} p99 {point['ttft_p99_ms']:.1f} ms")
    body = render(results, skipped, levels, engines)
    notes = [f"a fresh process per engine, adapter case and repetition, {a.threads} torch threads; closed loop, "
             f"{a.per_client} counted requests per client per figure after one warm-up request each (the clients "
             "start together: that burst is not counted); tokens/s over the counted requests' span; greedy, at "
             f"most {a.max_tokens} new tokens; engines in alternating order per repetition",
             "1 adapter: the baselines run it merged into the weights; ours keeps it in a slot",
             "prompts: every request a different chat prompt (the template and 'Write a short story about a' "
             "are shared: what our prefix cache can reuse; the baselines have none)",
             "CPU steal %: the share of CPU time the hypervisor gave to other guests while the point ran "
             "(/proc/stat); a tail in a point with high steal is the machine's, not the engine's",
             "8 adapters: requests cycle through them; per request peft set_adapter (one generate per "
             "request), peft adapter_names (static batches), slots (ours)"]
    facts = report.machine(argv, MODULE, a.reps)
    md, js = report.write(NAME, TITLE, facts, notes, body, {"args": vars(a), "raw": results, "skipped": skipped},
                          a.quick, a.output)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    return 0


def render(results: dict, skipped: dict, levels: list[int], engines: list[str]) -> str:
    lines = []
    for mixed in ("1", "8"):
        lines += ["", f"## {mixed} adapter{'s' if mixed == '8' else ''}", "",
                  "| engine | concurrency | output tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | CPU steal % |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for kind in engines:
            key = f"{kind}/{mixed}"
            if key in skipped and key not in results:
                lines.append(f"| {LABELS[kind]} | - | not run: {skipped[key]} | | | | |")
                continue
            for c in levels:
                runs = results.get(key, {}).get(str(c), [])
                col = lambda k, d=1, runs=runs: fmt(Stat.of([r[k] for r in runs]), d)  # noqa: E731
                lines.append(f"| {LABELS[kind]} | {c} | {col('tokens_per_s', 0)} | {col('ttft_p50_ms')} | "
                             f"{col('ttft_p99_ms')} | {col('tpot_p50_ms', 2)} | {col('steal_pct')} |")
    lines += ["", "## Bars", ""] + bars(results, levels)
    return "\n".join(lines)


def bars(results: dict, levels: list[int]) -> list[str]:
    """The issue's targets, each figure paired within a repetition (one process: drift cancels)."""
    def per_rep(key: str, c: int, field: str) -> list[float]:
        return [r[field] for r in results.get(key, {}).get(str(c), [])]

    out = []
    if 16 in levels:
        for mixed in ("1", "8"):
            x = ratios(per_rep(f"continuous/{mixed}", 16, "tokens_per_s"), per_rep(f"per_request/{mixed}", 16, "tokens_per_s"))
            if x:
                out.append(f"- tokens/s at c16, ours / one generate per request, {mixed} adapter(s) >= 4x: "
                           f"{fmt(x, 1, 'x')} -> {'MET' if x.median >= 4 else 'MISSED'}")
        x = ratios(per_rep("continuous/8", 16, "tokens_per_s"), per_rep("continuous/1", 16, "tokens_per_s"))
        if x:
            out.append(f"- ours at c16, 8 adapters / 1 adapter >= 0.80 (mixed adapters cost at most 20%): "
                       f"{fmt(x, 2, 'x')} (repetitions pair by order, each engine case in its own process) -> "
                       f"{'MET' if x.median >= 0.8 else 'MISSED'}")
    if 1 in levels and 32 in levels:
        for mixed in ("1", "8"):
            p99, p50 = per_rep(f"continuous/{mixed}", 32, "ttft_p99_ms"), per_rep(f"continuous/{mixed}", 1, "ttft_p50_ms")
            x = ratios(p99, p50)
            if x:
                held = sum(a / b <= 5 for a, b in zip(p99, p50) if b)
                out.append(f"- ours, TTFT p99 at c32 / TTFT p50 at c1 (same process) <= 5x, {mixed} adapter(s): "
                           f"{fmt(x, 1, 'x')}, {held} of {len(p99)} repetitions <= 5x -> "
                           f"{'MET' if x.median <= 5 else 'MISSED'}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
