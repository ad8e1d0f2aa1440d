"""What building the ONNX variants costs, what int8 scores at the parity gate, and how fast it is.

Builds the config's model (``--model``, minilm) with ``models.ensure_variants`` into a fresh
temporary cache, in a fresh spawned process each time (as ``loraserve up`` builds: imports
included), ``--reps`` times per setting, alternating: the configured settings (int8 prepared by
``models.variants.smoothing``: SmoothQuant, the first feed-forward outputs and the embedding
tables fp32, padding zeroed), the plain int8 build that came before it (``smoothquant: false``),
and per-tensor int8 weights. Reported: the time of each build step (from the build's own progress
lines; median and spread), each variant's parity against torch on the probe set (as the gate
computes it, 64 sentences and 318 inputs of one to three words; the same in every repetition,
which is checked), and the probe inputs where int8 agrees least with torch.

Then the int8 speed of each setting in one spawned process, as a replica runs it (the config's
ONNX threads, one by default): one probe sentence of 7-14 words per call (tokenized beforehand)
and batches of 32; ``--rounds`` rounds interleave the settings; ratios to the plain build are
per round, then the median.

Written to loadtest/results/variants-build.md and .json. Usage (from the repository root):
``.venv/bin/python -m loadtest.variant_build [--quick] [--model minilm]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loadtest import report
from loadtest.report import Stat, fmt, ratios, say

NAME, MODULE = "variants-build", "loadtest.variant_build"
TITLE = "ONNX variants: build cost and parity with torch"
CONFIGURED = "configured (SmoothQuant recipe, per-channel, static shapes)"
PLAIN = "plain int8 as before the recipe (smoothquant and static shapes off, per-channel)"
SETTINGS = {CONFIGURED: {}, PLAIN: {"smoothquant": False, "static_shapes": False},
            "per-tensor int8 (smoothquant and static shapes off)":
                {"smoothquant": False, "per_channel": False, "static_shapes": False}}


def step_name(message: str) -> str:
    """A progress line without its numbers and paths: the same step in every build."""
    who, _, text = message.rpartition(":")
    text = re.sub(r"\S*/\S*", "", text)
    text = re.sub(r"\(.*?\)|(?<![\w.-])\d+(\.\d+)?( s\b)?", "", text)
    text = re.sub(r"\bparity (passed|FAILED)\b", "parity check", text)
    text = re.sub(r"\s+", " ", text).strip(" ,.").removesuffix(" in")
    return f"{who.split('@', 1)[1]}: {text}" if "@" in who else text


def build_child(config: str, model_id: str, onnx_update: dict, worst: int, keep: str | None = None) -> dict:
    """One build into a fresh cache (in a spawned process); steps, parity, least agreeing. With
    ``keep``, the built cache is copied there (for the speed step)."""
    import numpy as np

    from loadtest.inprocess import model_spec
    from models import create_backend, ensure_variants, probe_texts, references, run_probe
    from serve.settings import load_settings

    spec = model_spec(load_settings(config), model_id)
    spec = spec.model_copy(update={"onnx": spec.onnx.model_copy(update=onnx_update)})
    lines: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="loadtest-variant-build-") as tmp:
        start = time.perf_counter()
        root = ensure_variants(spec, Path(tmp), force=True,
                               progress=lambda m: lines.append((time.perf_counter() - start, m)))
        total = time.perf_counter() - start
        parity = {v: json.loads((root / v / "manifest.json").read_text())["parity_at_build"]
                  for v in ("onnx", "onnx-int8")}
        backend = create_backend(spec, "onnx-int8", Path(tmp))
        backend.load()
        ours, ref = run_probe(backend), references(root)[0]
        backend.close()
        if keep:
            shutil.copytree(tmp, keep)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    texts = probe_texts()
    return {"total_s": total, "lines": lines, "parity": parity,
            "least": [(float(cos[i]), texts[i]) for i in np.argsort(cos)[:worst]]}


def speed_child(config: str, model_id: str, caches: dict[str, str], rounds: int) -> dict:
    """int8 of each setting, interleaved: ms per single-sentence call and sentences/s in batches
    of 32, per round."""
    from loadtest.inprocess import model_spec
    from models import create_backend, probe_texts
    from serve.settings import load_settings

    base = model_spec(load_settings(config), model_id)
    backends = {}
    for label, cache in caches.items():
        spec = base.model_copy(update={"onnx": base.onnx.model_copy(update=SETTINGS[label])})
        backends[label] = b = create_backend(spec, "onnx-int8", Path(cache))
        b.load()
    texts = [t for t in probe_texts() if 7 <= len(t.split()) <= 14][:25]
    out = {label: {"c1_ms": [], "batch32_per_s": []} for label in backends}
    for _ in range(rounds):
        for label, b in backends.items():
            rows = b.encode(texts)
            batch = (rows * 2)[:32]
            for r in rows[:5]:
                b.predict([r])
            t = time.perf_counter()
            for _ in range(6):
                for r in rows:
                    b.predict([r])
            out[label]["c1_ms"].append((time.perf_counter() - t) / (6 * len(rows)) * 1000)
            t = time.perf_counter()
            for _ in range(8):
                b.predict(batch)
            out[label]["batch32_per_s"].append(8 * 32 / (time.perf_counter() - t))
    for b in backends.values():
        b.close()
    return out


def speed_section(speed: dict) -> str:
    plain = speed[PLAIN]
    rows = ["| int8 build | one sentence, ms per call | vs plain (speed) | batches of 32, sentences/s | vs plain |",
            "|---|---:|---:|---:|---:|"]
    for label, v in speed.items():
        rows.append(f"| {label} | {fmt(Stat.of(v['c1_ms']), 2)} | "
                    f"{fmt(ratios(plain['c1_ms'], v['c1_ms']), 2)} | {fmt(Stat.of(v['batch32_per_s']), 0)} | "
                    f"{fmt(ratios(v['batch32_per_s'], plain['batch32_per_s']), 2)} |")
    return ("## int8 speed\n\nOne process, the settings interleaved per round; one call per sentence "
            "(25 probe sentences of 7-14 words, tokenized beforehand) and batches of 32. \"vs plain\": the "
            "plain build's time over this one's (above 1: faster), per round, then the median.\n\n"
            + "\n".join(rows))


def steps(builds: list[dict]) -> list[tuple[str, Stat | None]]:
    """Seconds from the previous progress line to each line, by step, over the builds."""
    order: list[str] = []
    per: dict[str, list[float]] = {}
    for b in builds:
        prev = 0.0
        for t, msg in b["lines"]:
            name = step_name(msg)
            if name not in per:
                order.append(name)
            per.setdefault(name, []).append(t - prev)
            prev = t
    return [(n, Stat.of(per[n])) for n in order]


def section(label: str, builds: list[dict]) -> str:
    rows = [f"| {n} | {fmt(s, 1)} |" for n, s in steps(builds)]
    first = builds[0]["parity"]
    same = all(b["parity"] == first for b in builds)
    par = ["| variant | max abs diff | mean cosine | least cosine | with probe adapter: max abs diff / "
           "mean cosine | passed |", "|---|---:|---:|---:|---|---|"]
    for v, p in first.items():
        a = p.get("adapter_probe", {})
        par.append(f"| {v} | {p['max_abs_diff']:.2g} | {p['mean_cosine']:.5f} | {p['min_cosine']:.4f} | "
                   f"{a.get('max_abs_diff', float('nan')):.2g} / {a.get('mean_cosine', float('nan')):.5f} | "
                   f"{p['passed']} |")
    worst = "\n".join(f"- {c:.4f}  {t!r}" for c, t in builds[0]["least"])
    return (f"## {label}\n\nWhole build: {fmt(Stat.of(b['total_s'] for b in builds))} s. Steps (seconds "
            "from the previous progress line):\n\n| step | seconds |\n|---|---:|\n" + "\n".join(rows)
            + "\n\nParity on the probe set" + ("" if same else " (first build; (!) the builds differed)")
            + ":\n\n" + "\n".join(par) + f"\n\nProbe sentences where int8 agrees least with torch:\n\n{worst}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="deploy/local.yaml")
    p.add_argument("--model", default="minilm")
    p.add_argument("--reps", type=int, default=3, help="builds per setting (>= 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: one build per setting")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the int8 speed step")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.rounds = 1, 2
    elif a.reps < 3:
        p.error("--reps must be >= 3; use --quick for a smoke run")
    from loadtest.inprocess import model_spec
    from serve.settings import load_settings

    spec = model_spec(load_settings(a.config), a.model)
    ctx = multiprocessing.get_context("spawn")
    builds: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="loadtest-variant-speed-") as kept:
        caches = {label: f"{kept}/{i}" for i, label in enumerate(SETTINGS)}
        for rep in range(a.reps):
            for label, update in SETTINGS.items():
                say(f"build {rep + 1}/{a.reps}: {label}")
                keep = caches[label] if rep == 0 else None
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    builds[label].append(pool.submit(build_child, a.config, spec.id, update, 3, keep).result())
                say(f"  {builds[label][-1]['total_s']:.1f} s")
        say(f"int8 speed: {a.rounds} rounds")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            speed = pool.submit(speed_child, a.config, spec.id, caches, a.rounds).result()
    notes = [f"model: {spec.id} ({spec.hub_id or spec.source}); each build in a fresh spawned process "
             "into a fresh temporary cache; settings alternate",
             f"parity as the gate computes it; thresholds: fp32 max abs diff {spec.onnx.parity.fp32_max_abs_diff:g}, "
             f"int8 mean cosine {spec.onnx.parity.int8_cosine}, least cosine {spec.onnx.parity.int8_min_cosine}"]
    body = "\n\n".join([section(label, b) for label, b in builds.items()] + [speed_section(speed)])
    facts = report.machine(argv, MODULE, a.reps)
    md, js = report.write(NAME, TITLE, facts, notes, body, {"args": vars(a), "builds": builds, "speed": speed}, a.quick, a.output)
    say(f"written to {report.rel(md)} and {report.rel(js)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
