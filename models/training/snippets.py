"""The real-text sentiment data: human-rated sentences (models/data/snippets/, VADER's ground
truth, MIT) turned into a binary task and split by document.

- **Clearly polar only.** Each sentence carries the mean of about 20 ratings on -4..+4. A mean
  of at least +1 is ``positive``, at most -1 ``negative``; the rest (mildly rated or neutral,
  where raters themselves disagree about the sign) is left out. ``THRESHOLD`` is that 1.0.
- **Split by document.** Sentences of one review or editorial share the id prefix before ``_``;
  each corpus's documents are shuffled with one seeded generator and cut 70 / 15 / 15 into train,
  validation and test by document, so no document straddles two splits.
- The files written (``train``, ``validation``, ``test-amazon``, ``test-nyt``, ``test``) hold
  ``{"text", "label", "corpus", "id", "rating"}`` per line; training reads ``text`` and
  ``label``. ``python -m models.training.snippets`` rewrites them byte for byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data" / "snippets"
CORPORA = {"amazon": "amazonReviewSnippets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}
THRESHOLD = 1.0
FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
SEED = 0


def read_corpus(path: Path, corpus: str) -> list[dict]:
    """Every rated sentence of one ground-truth file (``id<TAB>mean<TAB>text``)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected id, rating and text separated by tabs")
        rows.append({"id": parts[0], "rating": float(parts[1]), "text": parts[2].strip(), "corpus": corpus})
    return rows


def polar(rows: list[dict], threshold: float = THRESHOLD) -> list[dict]:
    """The clearly polar sentences, labelled by the sign of their mean rating."""
    out = []
    for row in rows:
        if row["rating"] >= threshold or row["rating"] <= -threshold:
            out.append({"text": row["text"], "label": "positive" if row["rating"] > 0 else "negative",
                        "corpus": row["corpus"], "id": row["id"], "rating": row["rating"]})
    return out


def split_by_document(rows: list[dict], seed: int = SEED) -> dict[str, list[dict]]:
    """Train / validation / test by document (id prefix), shuffled with one seeded generator."""
    docs = sorted({r["id"].split("_")[0] for r in rows}, key=lambda d: (len(d), d))
    order = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    cut1 = round(len(order) * FRACTIONS["train"])
    cut2 = cut1 + round(len(order) * FRACTIONS["validation"])
    side = {d: "train" if i < cut1 else "validation" if i < cut2 else "test" for i, d in enumerate(order)}
    out: dict[str, list[dict]] = {k: [] for k in FRACTIONS}
    for row in rows:
        out[side[row["id"].split("_")[0]]].append(row)
    return out


def build(data: Path = DATA) -> dict[str, list[dict]]:
    """All files' rows: ``train`` and ``validation`` over both corpora, a test file per corpus and
    ``test`` with both."""
    files: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for corpus, name in CORPORA.items():
        parts = split_by_document(polar(read_corpus(data / name, corpus)))
        for split, rows in parts.items():
            files[split] += rows
        files[f"test-{corpus}"] = parts["test"]
    return files


def write(files: dict[str, list[dict]], out: Path = DATA) -> dict[str, Path]:
    paths = {}
    for name, rows in files.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.snippets", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DATA, help=f"Folder for the .jsonl files. Default: {DATA}.")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write(build(), args.out).values():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        pos = sum(r["label"] == "positive" for r in rows)
        print(f"{path}: {len(rows)} rows ({pos} positive, {len(rows) - pos} negative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
