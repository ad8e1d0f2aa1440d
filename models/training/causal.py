"""Train a LoRA adapter on a causal LM by supervised fine-tuning, and write it with its card.

Policy, and why:
- The base is a local Hugging Face causal LM directory or ``package:<module>`` (default: the
  shipped ``storyteller``); nothing is downloaded. peft's ``CAUSAL_LM`` task; LoRA on every
  linear layer but the output head by default (``all-linear``), which the server's slots serve.
- Data: ``sft_data`` (prompt/completion or chat JSONL); the loss covers the completion only,
  prompts are tokenized exactly as the server tokenizes them.
- Three disjoint sets, as for classification (``finetune``): training rows; validation (a file,
  or a seeded carve of at least 8 rows) scored every epoch for early stopping and the best epoch
  (lowest validation loss); held-out sets (``--eval`` files, else a seeded split) scored once.
- Each held-out set is reported for the adapter and for the bare base on the same rows:
  completion loss (mean per token) and exact match of greedy generation (the text before the
  end-of-text token equals the completion, surrounding space ignored), with a few samples.
- Output and card as ``finetune``'s (``output.save_adapter``), with ``task: generate``.
Bad input raises ``ValueError`` naming the value and the limit.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from models.sources import resolve_source, sha256_file
from models.training.output import check_out_dir, save_adapter
from models.training.sft_data import IGNORE, encode, read_sft

DEFAULT_BASE = "package:models.generative.storyteller"
SAMPLES = 3


class CausalSettings(BaseModel):
    """Training knobs; recorded verbatim in the card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(("all-linear",), min_length=1,
                                            description="Module names LoRA wraps (all-linear: every linear layer but the head).")
    epochs: int = Field(4, ge=1, le=100, description="Most epochs (early stopping may end sooner).")
    learning_rate: float = Field(2e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per training step.")
    max_length: int = Field(256, ge=8, le=8192, description="Most tokens of prompt plus completion.")
    patience: int = Field(1, ge=1, description="Epochs without a lower validation loss before stopping.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share carved from train for validation.")
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="Held-out share when no eval file.")
    seed: int = Field(0, ge=0, description="Seed for splits, LoRA init and shuffling.")


def _carve(n: int, fraction: float, seed: int, floor: int = 8) -> tuple[list[int], list[int]]:
    import numpy as np

    idx = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    k = min(max(int(n * fraction), floor), n // 3)
    if k < 1:
        raise ValueError(f"{n} training rows are too few to split off validation or held-out rows")
    return idx[k:], idx[:k]


def _train(model, tokenizer, data: dict, settings: CausalSettings, work: Path):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, TrainingArguments

    sets = {k: Dataset.from_dict({"input_ids": v["input_ids"], "labels": v["labels"]}) for k, v in data.items()}
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"), num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate, warmup_ratio=0.1, weight_decay=0.01,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=32,
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch", save_only_model=True,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False, seed=settings.seed, data_seed=settings.seed, use_cpu=True, report_to=[],
        group_by_length=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.patience)],
    )
    trainer.train()
    history, losses = [], {}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            losses[round(entry["epoch"])] = round(entry["loss"], 4)
        if "eval_loss" in entry:
            epoch = round(entry["epoch"])
            history.append({"epoch": epoch, "train_loss": losses.get(epoch),
                            "validation_loss": round(entry["eval_loss"], 4)})
    best = min(history, key=lambda h: h["validation_loss"])["epoch"]
    return trainer.model, history, best


def score(model, tokenizer, enc: dict) -> dict:
    """Completion loss per token and greedy exact match over one encoded held-out set."""
    import torch

    total, count, exact, outputs = 0.0, 0, 0, []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    with torch.no_grad():
        for ids, labels, prompt, completion in zip(enc["input_ids"], enc["labels"], enc["prompt_ids"],
                                                   enc["completion"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
            new = len(ids) - len(prompt) + 8  # room for the completion and a little more
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
            text = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
            exact += text.strip() == completion.strip()
            outputs.append(text)
    n = len(enc["input_ids"])
    return {"rows": n, "loss": round(total / max(count, 1), 4), "exact_match": round(exact / n, 4)}, outputs


def finetune_causal(
    train_file, out_dir, *, eval_file=None, validation_file=None, base: str = DEFAULT_BASE,
    base_hub_id: str | None = None, settings: CausalSettings | None = None, command: str | None = None,
    overwrite: bool = False, say=lambda msg: None,
) -> dict:
    """Train one generation adapter into ``out_dir`` (see the module docstring); returns the card."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    settings = settings or CausalSettings()
    out_dir = check_out_dir(Path(out_dir), overwrite)
    trains, evals = _paths(train_file), _paths(eval_file)
    if len({p.stem for p in evals}) != len(evals):
        raise ValueError(f"eval files need distinct names, got {[str(p) for p in evals]}")
    train = [r for p in trains for r in read_sft(p)]
    if evals:
        held = {p.stem: read_sft(p) for p in evals}
    else:
        keep, cut = _carve(len(train), settings.eval_fraction, settings.seed)
        train, held = [train[i] for i in keep], {"held_out": [train[i] for i in cut]}
    if validation_file is not None:
        validation, val_how = read_sft(Path(validation_file)), f"rows from {validation_file}"
    else:
        keep, cut = _carve(len(train), settings.validation_fraction, settings.seed + 1)
        train, validation = [train[i] for i in keep], [train[i] for i in cut]
        val_how = f"{len(cut)} rows carved from the training rows"
    base_dir = resolve_source(base)
    set_seed(settings.seed)
    kw = dict(local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, use_fast=True, **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = {"train": encode(tokenizer, train, settings.max_length, "train"),
            "validation": encode(tokenizer, validation, settings.max_length, "validation")}
    held_enc = {k: encode(tokenizer, rows, settings.max_length, k) for k, rows in held.items()}
    say(f"train: {len(train)} rows; validation: {val_how}; held out: "
        + ", ".join(f"{k} ({len(v)} rows)" for k, v in held.items()))
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, **kw)
    modules = settings.target_modules
    lora = LoraConfig(task_type="CAUSAL_LM", r=settings.rank, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout,
                      target_modules=modules[0] if modules == ("all-linear",) else list(modules))
    model = get_peft_model(model, lora)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraserve-sft-") as tmp:
        model, history, best = _train(model, tokenizer, data, settings, Path(tmp))
    seconds = round(time.perf_counter() - started, 1)
    held_out, samples = {}, {}
    for name, enc in held_enc.items():
        adapter, texts = score(model, tokenizer, enc)
        with model.disable_adapter():
            bare, base_texts = score(model, tokenizer, enc)
        held_out[name] = {"adapter": adapter, "base": bare}
        samples[name] = [{"prompt": _prompt_text(held[name][i]), "expected": enc["completion"][i],
                          "adapter": texts[i], "base": base_texts[i]} for i in range(min(SAMPLES, len(texts)))]
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_hub_id or str(base_dir)
    if not isinstance(config.target_modules, str):
        config.target_modules = sorted(config.target_modules)  # a set in peft: order varies by run
    files = {"train": trains, "validation": [Path(validation_file)] if validation_file else [], "eval": evals}
    card = {
        "format": 2, "task": "generate", "base": {"source": base, "hub_id": base_hub_id},
        "data": {k: [{"path": str(p), "sha256": sha256_file(p)} for p in v] for k, v in files.items() if v},
        "rows": {"train": len(train), "validation": len(validation)} | {k: len(v) for k, v in held.items()},
        "validation": val_how,
        "metrics": {"epochs": history, "best_epoch": best, "held_out": held_out, "samples": samples},
        "settings": settings.model_dump(mode="json"), "command": command, "train_seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    save_adapter(model, card, render_readme(card, out_dir.name), out_dir)
    return card


def _prompt_text(row: dict) -> str:
    return row["prompt"] if row["messages"] is None else row["messages"][-1]["content"]


def _paths(given) -> list[Path]:
    if given is None:
        return []
    return [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given]


def held_out_table(card: dict) -> list[str]:
    lines = ["| held-out set | rows | model | exact match | completion loss |", "|---|---|---|---|---|"]
    for name, m in card["metrics"]["held_out"].items():
        for who in ("adapter", "base"):
            lines.append(f"| {name} | {m[who]['rows']} | {who} | {m[who]['exact_match']:.4f} | {m[who]['loss']:.4f} |")
    return lines


def render_readme(card: dict, name: str) -> str:
    hub = card["base"]["hub_id"]
    lines = ["---", "library_name: peft", *([f"base_model: {hub}"] if hub else []),
             "pipeline_tag: text-generation", "tags: [lora, loraserve]", "---", "", f"# {name}", "",
             f"LoRA adapter (rank {card['settings']['rank']}) for text generation on "
             f"`{hub or card['base']['source']}`, trained by `loraserve train --task generate` "
             "(`models/training/causal.py`).", "",
             f"Held out: scored once, after training, at the best epoch ({card['metrics']['best_epoch']}), "
             "for the adapter and for the bare base on the same rows.", "", *held_out_table(card), "",
             "| epoch | train loss | validation loss |", "|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['train_loss']} | {h['validation_loss']} |" for h in card["metrics"]["epochs"]]
    for set_name, rows in card["metrics"]["samples"].items():
        lines += ["", f"Samples from `{set_name}` (greedy):", ""]
        for s in rows:
            lines += [f"- prompt: {s['prompt'][:160]!r}", f"  - expected: {s['expected']!r}",
                      f"  - adapter: {s['adapter']!r}", f"  - base: {s['base'][:160]!r}"]
    lines += ["", "| data | file | sha256 |", "|---|---|---|"]
    lines += [f"| {k} | `{d['path']}` | `{d['sha256']}` |" for k, files in card["data"].items() for d in files]
    lines += ["", "Command:", "", "```", str(card["command"]), "```", "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in card["settings"].items()), ""]
    return "\n".join(lines)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a LoRA adapter for text generation (SFT).")
    p.add_argument("--task", choices=["generate"], default="generate", help=argparse.SUPPRESS)
    p.add_argument("--train", required=True, type=Path, action="append",
                   help="Training rows (.jsonl: prompt/completion or messages). Repeat to join files.")
    p.add_argument("--eval", type=Path, action="append", help="Held-out rows, scored once; repeatable.")
    p.add_argument("--validation", type=Path, help="Validation rows for early stopping; default: carved.")
    p.add_argument("--out", required=True, type=Path, help="Adapter directory to write.")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"Local directory or package:<module>. Default: {DEFAULT_BASE}.")
    p.add_argument("--base-hub-id", help="Hub id written as the adapter's base. Default: none (the local path).")
    p.add_argument("--overwrite", action="store_true", help="Write into a non-empty --out.")
    for name, field in CausalSettings.model_fields.items():
        listy = name == "target_modules"
        p.add_argument("--" + name.replace("_", "-"),
                       type=(lambda t: tuple(x.strip() for x in t.split(",") if x.strip())) if listy else str,
                       help=f"{field.description} Default: {field.default}.")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m models.training.causal") -> int:
    from models.errors import ModelLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    given = {k: getattr(args, k) for k in CausalSettings.model_fields if getattr(args, k) is not None}
    try:
        card = finetune_causal(
            args.train, args.out, eval_file=args.eval, validation_file=args.validation, base=args.base,
            base_hub_id=args.base_hub_id, settings=CausalSettings(**given), overwrite=args.overwrite,
            command=f"{prog} {shlex.join(argv)}", say=print,
        )
    except (ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {card['train_seconds']} s (best epoch {card['metrics']['best_epoch']})")
    print("\n".join(held_out_table(card)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
