"""The two demo adapters that ship in adapters/, and how to rebuild them byte for byte.

``make adapters`` runs ``python -m models.training.demo``: ``sentiment`` on the real,
human-rated snippets (models/data/snippets/; settings from the sweep in
docs/results/sentiment-sweep.md), reported beside VADER and the majority class per corpus;
``topic`` on the templated headlines, reported on the seen- and the unseen-template test sets;
``ending`` on the generative base (``storyteller``): how a story ends, in one sentence
(models/data/endings/, written by ``models.generative.endings``), reported as exact match and
completion loss against the bare base on held-out stories and on stories about unseen names.

Reproducible: seeded splits, head and LoRA initialisation and shuffling, and one numeric path.
``models.machine.pinned`` sets the CPU kernels torch, MKL and oneDNN choose (AVX2, two threads), so
that a machine with AVX-512 computes what an AVX2 machine does; ``make reproduce`` retrains both
into a temporary folder and compares the sha256 of each ``adapter_model.safetensors`` with the
shipped one (the card's time fields are left out of the comparison by construction: only the
weights are hashed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.machine import pinned

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = "models/data/snippets"
TOPIC = "models/data/topic"
ENDINGS = "models/data/endings"
SENTIMENT_SETTINGS = ["--rank", "8", "--alpha", "16", "--target-modules", "query,key,value,dense",
                      "--epochs", "4", "--patience", "1", "--learning-rate", "1e-3", "--batch-size", "32",
                      "--max-length", "64", "--seed", "0"]


ENDING_SETTINGS = ["--rank", "8", "--alpha", "16", "--epochs", "4", "--patience", "1", "--learning-rate", "2e-3",
                      "--batch-size", "16", "--max-length", "192", "--seed", "0"]


def commands(out: Path) -> dict[str, list[str]]:
    """The finetune argv of each demo adapter, writing into ``out``/<name> (paths relative to the repo)."""
    return {
        "sentiment": ["--train", f"{SNIPPETS}/train.jsonl", "--validation", f"{SNIPPETS}/validation.jsonl",
                      "--eval", f"{SNIPPETS}/test-amazon.jsonl", "--eval", f"{SNIPPETS}/test-nyt.jsonl",
                      "--baseline", "vader", "--out", str(out / "sentiment"), "--overwrite", *SENTIMENT_SETTINGS],
        "topic": ["--train", f"{TOPIC}/train.jsonl", "--eval", f"{TOPIC}/test.jsonl",
                  "--eval", f"{TOPIC}/test_unseen_templates.jsonl", "--out", str(out / "topic"), "--overwrite",
                  "--seed", "0"],
        "ending": ["--task", "generate", "--train", f"{ENDINGS}/train.jsonl",
                      "--validation", f"{ENDINGS}/validation.jsonl", "--eval", f"{ENDINGS}/test.jsonl",
                      "--eval", f"{ENDINGS}/test-new-names.jsonl", "--out", str(out / "ending"), "--overwrite",
                      *ENDING_SETTINGS],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("adapters"), help="Store folder. Default: adapters.")
    p.add_argument("--only", choices=["sentiment", "topic", "ending"], help="Build one adapter.")
    args = p.parse_args(argv)
    pinned("models.training.demo", list(argv if argv is not None else sys.argv[1:]))
    from models.training.finetune import main as finetune_main

    os.chdir(ROOT)
    for name, cmd in commands(args.out).items():
        if args.only in (None, name):
            print(f"== {name}", flush=True)
            status = finetune_main(cmd, prog="python -m models.training.finetune")
            if status:
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
