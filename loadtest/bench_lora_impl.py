"""LoRA on the torch encoder: the service's slots (``models.LoraEncoder``) vs peft, in process.

peft (``get_peft_model`` + ``add_adapter`` + per-row ``adapter_names``: loadtest/peft_encoder.py)
against slots of stacked matrices with one gathered batched matmul per module. Same base (the
config's first model), the same adapter file (the shipped ``sentiment``, registered under
``--adapters`` names), ``--threads`` torch threads. Each repetition builds both encoders afresh
and times, alternating between them: adapter load and unload, and a batch of 32 rows with base
rows only, one adapter, and rows mixed over 16 and over all adapters (each the median of
``--calls`` calls). Figures: medians over the repetitions, with the spread.

Written to loadtest/results/lora-impl.md and .json. Usage (from the repository root):
``.venv/bin/python -m loadtest.bench_lora_impl [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from loadtest import report
from loadtest.report import Stat, fmt, ratios, say

NAME, MODULE = "lora-impl", "loadtest.bench_lora_impl"
TITLE = "LoRA on the torch encoder: slots vs peft (in process)"
TEXT = "a short sentence about the weather today"
LABELS = ("negative", "positive")


def encoder(impl: str, model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    if impl == "peft":
        from loadtest.peft_encoder import PeftEncoder

        return PeftEncoder(model)
    from models import LoraEncoder

    return LoraEncoder(model, slots=64)


def timed_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def one_round(impl: str, model_dir, check, ids, mask, n: int, calls: int) -> dict:
    import torch

    e = encoder(impl, model_dir)
    out = {}
    t0 = time.perf_counter()
    for i in range(n):
        e.add(f"a{i}", check, "classify", LABELS)
    out["load ms per adapter"] = 1000 * (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    e.remove("a0")
    out["unload ms"] = 1000 * (time.perf_counter() - t0)
    e.add("a0", check, "classify", LABELS)
    rows = {"base rows only": [None] * 32, "1 adapter": ["a1"] * 32,
            "16 adapters mixed": [f"a{i % 16}" for i in range(32)],
            f"{n} adapters mixed": [f"a{i % n}" for i in range(32)],
            "half base, 16 adapters": [None if i % 2 else f"a{i % 16}" for i in range(32)]}
    with torch.inference_mode():
        e.forward(ids, mask, [None] * 32)  # warm
        for label, names in rows.items():
            out[f"batch of 32, {label} (ms)"] = timed_ms(lambda names=names: e.forward(ids, mask, names), calls)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="deploy/local.yaml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="repetitions (>= 3)")
    p.add_argument("--calls", type=int, default=5, help="timed calls per batch figure")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 2 calls")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.calls = 1, 2
    elif a.reps < 3:
        p.error("--reps must be >= 3; use --quick for a smoke run")

    import torch

    from models import base_weight_shapes, resolve_source, validate_adapter
    from serve.settings import load_settings

    torch.set_num_threads(a.threads)
    settings = load_settings(a.config)
    spec = settings.models[0]
    model_dir = resolve_source(spec.source)
    check = validate_adapter("sentiment", [report.REPO / "adapters"], base_shapes=base_weight_shapes(model_dir),
                             task="classify", max_rank=64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = tok([TEXT] * 32, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    got: dict[str, list[dict]] = {"peft": [], "slots": []}
    for rep in range(a.reps):
        for impl in ("peft", "slots") if rep % 2 == 0 else ("slots", "peft"):
            say(f"repetition {rep + 1}/{a.reps}: {impl}")
            got[impl].append(one_round(impl, model_dir, check, ids, mask, a.adapters, a.calls))
    lines = ["| measure | peft | slots | slots / peft (per repetition) |", "|---|---:|---:|---:|"]
    for key in got["peft"][0]:
        pv, sv = [r[key] for r in got["peft"]], [r[key] for r in got["slots"]]
        lines.append(f"| {key} | {fmt(Stat.of(pv), 2)} | {fmt(Stat.of(sv), 2)} | {fmt(ratios(sv, pv), 2)} |")
    body = "\n".join(lines)
    notes = [f"base: {spec.id} ({spec.hub_id or spec.source}); adapter: adapters/sentiment (rank "
             f"{check.rank}) registered as {a.adapters} names; {a.threads} torch thread(s); batch of 32 "
             f"rows of {ids.shape[1]} tokens; each batch figure is the median of {a.calls} calls; the "
             "order of the two implementations alternates between repetitions",
             "the service uses slots (models/lora_slots.py)"]
    facts = report.machine(argv, MODULE, a.reps)
    md, js = report.write(NAME, TITLE, facts, notes, body, {"args": vars(a), "raw": got}, a.quick, a.output)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
