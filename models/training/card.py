"""The adapter card in words: the README.md written beside ``loraserve_card.json`` (with the
Hub's front matter; peft's own README would name a local path), and the summary ``loraserve
train`` prints. Both show every held-out set beside its baselines, and its confusion matrix."""

from __future__ import annotations


def held_out_table(card: dict) -> list[str]:
    """One row per held-out set and scorer: accuracy and macro-F1."""
    lines = ["| held-out set | rows | scorer | accuracy | macro-F1 |", "|---|---|---|---|---|"]
    for name, scorers in card["metrics"]["held_out"].items():
        for scorer, m in scorers.items():
            label = f"majority class (`{card['metrics']['majority_label']}`)" if scorer == "majority" else scorer
            lines.append(f"| {name} | {m['rows']} | {label} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
    return lines


def confusion_tables(card: dict) -> list[str]:
    labels = card["labels"]
    lines = []
    for name, scorers in card["metrics"]["held_out"].items():
        lines += ["", f"Confusion matrix of the adapter on `{name}` (rows: true label, columns: predicted):", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for label, counts in zip(labels, scorers["adapter"]["confusion"]):
            lines.append(f"| {label} | " + " | ".join(str(c) for c in counts) + " |")
    return lines


def render_readme(card: dict, name: str) -> str:
    hub = card["base"]["hub_id"]
    lines = ["---", "library_name: peft", *([f"base_model: {hub}"] if hub else []),
             "pipeline_tag: text-classification", "tags: [lora, loraserve]", "---", "",
             f"# {name}", "",
             f"LoRA adapter (rank {card['settings']['rank']}) for sequence classification on "
             f"`{hub or card['base']['source']}`, trained by `loraserve train` (`models/training/finetune.py`).", "",
             "Labels in id order: " + ", ".join(f"{i} `{lab}`" for i, lab in enumerate(card["labels"])), "",
             f"Held out: scored once, after training, at the best epoch ({card['metrics']['best_epoch']}); "
             "beside the majority class of the training rows and any baseline, on the same rows.", "",
             *held_out_table(card), *confusion_tables(card), "",
             "| epoch | train loss | validation loss | validation accuracy | validation macro-F1 |",
             "|---|---|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['train_loss']} | {h['validation_loss']} | {h['validation_accuracy']} "
              f"| {h['validation_macro_f1']} |" for h in card["metrics"]["epochs"]]
    rows = card["rows"]
    lines += ["", "Rows: " + ", ".join(f"{n} {k}" for k, n in rows.items()) + f". Validation: {card['validation']}.",
              "", "| data | file | sha256 |", "|---|---|---|"]
    lines += [f"| {k} | `{d['path']}` | `{d['sha256']}` |" for k, files in card["data"].items() for d in files]
    lines += ["", "Command:", "", "```", str(card["command"]), "```", "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in card["settings"].items()), ""]
    return "\n".join(lines)


def summary(card: dict) -> str:
    """What ``loraserve train`` prints at the end: the held-out table and confusion matrices."""
    return "\n".join([*held_out_table(card), *confusion_tables(card)])
