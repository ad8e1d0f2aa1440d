"""The small sweep behind the shipped ``sentiment`` adapter's settings: a few LoRA ranks, target
modules and learning rates, and whether adding the templated sentences helps, each trained on
the snippets' train split with early stopping on their validation split.

The choice is made on the validation split only (its best-epoch macro-F1); the test splits
are not part of the report. Each run's adapter goes to
a temporary folder. Writes ``docs/results/sentiment-sweep.md`` and ``.json``::

    python -m models.training.sweep            # about 1-2 minutes per epoch per run on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from models.machine import cpu_facts
from models.training.finetune import FinetuneSettings, finetune
from models.training.snippets import DATA

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "results" / "sentiment-sweep"
TEMPLATED = ROOT / "models" / "data" / "sentiment" / "train.jsonl"
ALL = ("query", "key", "value", "dense")
RUNS = {  # name: (settings changed from BASE, extra training file)
    "r8 all lr1e-3": ({}, None),
    "r8 all lr2e-3": ({"learning_rate": 2e-3}, None),
    "r16 query,value lr1e-3": ({"rank": 16, "alpha": 32.0, "target_modules": ("query", "value")}, None),
    "r8 all lr1e-3 + templated": ({}, TEMPLATED),
}
BASE = {"rank": 8, "alpha": 16.0, "target_modules": ALL, "epochs": 4, "patience": 1, "learning_rate": 1e-3,
        "batch_size": 32, "max_length": 64, "seed": 0}


def run(names: list[str]) -> list[dict]:
    results = []
    for name in names:
        changes, extra = RUNS[name]
        settings = FinetuneSettings(**(BASE | changes))
        trains = [DATA / "train.jsonl", *([extra] if extra else [])]
        with tempfile.TemporaryDirectory() as tmp:
            card = finetune(trains, Path(tmp) / "a", eval_file=[DATA / "test-amazon.jsonl", DATA / "test-nyt.jsonl"],
                            validation_file=DATA / "validation.jsonl", settings=settings)
        best = next(e for e in card["metrics"]["epochs"] if e["epoch"] == card["metrics"]["best_epoch"])
        results.append({"run": name, "settings": settings.model_dump(mode="json"), "best_epoch": best["epoch"],
                        "validation_macro_f1": best["validation_macro_f1"],
                        "validation_accuracy": best["validation_accuracy"],
                        "train_seconds": card["train_seconds"]})
        print(json.dumps(results[-1]), flush=True)
    return results


def report(results: list[dict], command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    facts = cpu_facts()
    chosen = max(results, key=lambda r: (r["validation_macro_f1"], -r["train_seconds"]))
    lines = ["# Sentiment adapter: settings sweep", "",
             f"Commit {commit}{' (with uncommitted changes)' if dirty else ''}; command `{command}`; "
             f"CPU {facts['model']} ({facts['isa']}); {len(results)} runs.", "",
             "Every run: the snippets' train split (plus the templated sentences where named), early stopping on "
             "the validation split (patience 1, at most 4 epochs), batch 32, 64 tokens, seed 0. Chosen by "
             "validation macro-F1 at the best epoch; the test splits are not looked at here (the chosen "
             "settings' test results are in the adapter's card). `all`: LoRA on query, key, value and every "
             "dense layer; alpha is twice the rank. The epochs are the `epochs` setting's answer: early "
             "stopping ends a run one epoch after its best.", "",
             "| run | best epoch | validation macro-F1 | validation accuracy | train s |",
             "|---|---|---|---|---|"]
    for r in results:
        mark = " (chosen)" if r is chosen else ""
        lines.append(f"| {r['run']}{mark} | {r['best_epoch']} | {r['validation_macro_f1']:.4f} | "
                     f"{r['validation_accuracy']:.4f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="Which runs (default: all).")
    args = p.parse_args(argv)
    results = run(args.runs)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(report(results, "python -m models.training.sweep " + " ".join(argv or [])))
    print(f"wrote {OUT}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
