"""Training data: reading a user's file (JSONL or CSV with string ``text`` and ``label``
columns) into a ``datasets.Dataset`` with clear errors, seeded per-label splits (with a floor,
so that a small file still gets a validation split worth scoring), and the label order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
COLUMNS = ("text", "label")
VALIDATION_FLOOR = 8  # rows per label the validation split gets at least (a third at most)


def _check_jsonl(path: Path) -> None:
    """Each line one JSON object: say which line is not (``datasets`` would say less)."""
    import json

    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"data file {str(path)!r} is not JSONL: line {n}: {exc.msg}") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"data file {str(path)!r} is not JSONL: line {n} is not an object")
        except UnicodeDecodeError:
            raise ValueError(f"data file {str(path)!r} is not UTF-8 text") from None


def read_rows(path: Path, cache_dir: Path | None = None):
    """A ``datasets.Dataset`` with string ``text`` and ``label`` columns, from CSV or JSONL."""
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(f"data file {str(path)!r}: extension {path.suffix!r} is not one of "
                         f"{sorted(LOADERS)}")
    if loader == "json":
        _check_jsonl(path)
    try:
        ds = load_dataset(loader, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # datasets wraps pyarrow's and pandas' parse errors in its own
        cause = str(exc.__cause__ or exc).strip().splitlines()
        raise ValueError(f"data file {str(path)!r} could not be read as {path.suffix[1:].upper()}: "
                         f"{cause[0] if cause else type(exc).__name__}") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"data file {str(path)!r} lacks column(s) {missing}; it has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"data file {str(path)!r} has no rows")
    for col in COLUMNS:
        if ds.features[col].dtype not in ("string", "large_string"):
            raise ValueError(f"data file {str(path)!r}: column {col!r} holds {ds.features[col].dtype}, "
                             "not strings")
        blank = [i for i, v in enumerate(ds[col]) if v is None or not v.strip()]
        if blank:
            raise ValueError(f"data file {str(path)!r}: column {col!r} is empty in {len(blank)} row(s), "
                             f"the first is row {blank[0]}")
    return ds.select_columns(list(COLUMNS))


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, split-off) row indices; each label gives ``floor(n * fraction)`` rows but keeps one.

    If that rounds to nothing, one row of the largest label is split off, so the split is never
    empty; a label with a single row always stays in the kept part.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    kept, split = [], []
    for lab in sorted(by_label):
        idx = list(rng.permutation(by_label[lab]))
        n = min(int(len(idx) * fraction), len(idx) - 1)
        split += idx[:n]
        kept += idx[n:]
    if not split:
        largest = max(sorted(by_label), key=lambda k: len(by_label[k]))
        if len(by_label[largest]) < 2:
            raise ValueError(f"{len(labels)} rows are too few to split off a fraction of {fraction}")
        split.append(by_label[largest][0])
        kept.remove(by_label[largest][0])
    return sorted(int(i) for i in kept), sorted(int(i) for i in split)


def validation_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int], str]:
    """(train, validation) row indices carved per label, and how, in words. Each label gives
    ``fraction`` of its rows, but at least ``VALIDATION_FLOOR`` (never more than a third): with
    60 rows, 10% would leave 3 validation rows, which score 1.0 from the first epoch and give
    early stopping nothing to go on."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    kept, split, floored = [], [], []
    for lab in sorted(by_label):
        idx = [int(i) for i in rng.permutation(by_label[lab])]
        n = int(len(idx) * fraction)
        if n < VALIDATION_FLOOR:
            n, floored = min(VALIDATION_FLOOR, len(idx) // 3), floored + [lab]
        split += idx[:n]
        kept += idx[n:]
    if not split:
        raise ValueError(f"{len(labels)} training rows are too few for a validation split "
                         f"(each label needs at least 3 rows)")
    how = f"{len(split)} rows carved from the training rows, per label: {fraction:.0%}"
    if floored:
        how += f", raised to a floor of {VALIDATION_FLOOR} (at most a third) for {len(floored)} label(s)"
    return sorted(kept), sorted(split), how


def check_held_out(name: str, held_labels: set[str], labels: Sequence[str]) -> None:
    """A held-out set must hold every label, or its accuracy says nothing about the missing ones."""
    missing = sorted(set(labels) - held_labels)
    if missing:
        raise ValueError(f"held-out set {name!r} has no rows labelled {missing}: add some, or let "
                         "training split a held-out set off the training rows")


def label_order(train_labels: set[str], eval_labels: set[str], given: Sequence[str] | None) -> list[str]:
    """Labels in id order: ``given`` as is, else sorted; checks both sets against it."""
    order = list(given) if given else sorted(train_labels)
    if len(set(order)) < 2:
        raise ValueError(f"need at least 2 distinct labels, got {sorted(set(order))}")
    if len(set(order)) != len(order):
        raise ValueError(f"labels {order} contain duplicates")
    unknown = sorted(train_labels - set(order))
    if unknown:
        raise ValueError(f"train labels {unknown} are not among the given labels {order}")
    if len(train_labels) < 2:
        raise ValueError(f"need at least 2 distinct train labels, got {sorted(train_labels)}")
    unseen = sorted(eval_labels - train_labels)
    if unseen:
        raise ValueError(f"eval labels {unseen} do not occur in the train labels {sorted(train_labels)}")
    return order
