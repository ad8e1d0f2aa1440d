"""An adapter's config: peft's ``adapter_config.json`` (LoRA only, no remote code), the task it
serves on a base (from its peft ``task_type``), and the label names in its model card."""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "loraserve_card.json"  # written by `loraserve train`; holds the label names
# peft task types per serving task
TASK_TYPES = {"classify": {"SEQ_CLS"}, "embed": {"FEATURE_EXTRACTION", None}, "generate": {"CAUSAL_LM"}}
# What an adapter on an encoder base serves, by its peft task type.
ENCODER_ADAPTER_TASKS = {"SEQ_CLS": "classify", "FEATURE_EXTRACTION": "embed", None: "embed"}


def read_config(directory: Path) -> dict:
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}", param="lora_path") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object", param="lora_path")
    if "auto_map" in cfg or cfg.get("auto_mapping"):
        raise InvalidAdapter("adapters with auto_map (remote code) are refused", param="lora_path")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"peft_type {cfg.get('peft_type')!r} is not LORA", param="lora_path")
    return cfg


def adapter_task(task_type: str | None, base_task: str) -> str:
    """The task an adapter serves on a base, from its peft ``task_type``: on an encoder base
    (embed or classify) ``SEQ_CLS`` classifies and ``FEATURE_EXTRACTION`` (or none) embeds;
    on a generative base ``CAUSAL_LM`` generates."""
    if base_task in ("embed", "classify") and task_type in ENCODER_ADAPTER_TASKS:
        return ENCODER_ADAPTER_TASKS[task_type]
    if base_task == "generate" and task_type == "CAUSAL_LM":
        return "generate"
    raise InvalidAdapter(
        f"adapter task_type {task_type!r} does not fit a base serving {base_task!r}",
        param="lora_path",
    )


def read_labels(directory: Path) -> tuple[str, ...]:
    """Label names from the adapter's model card (``loraserve train`` writes it); without a
    card the server names them ``LABEL_<i>``. The count is checked against the head later."""
    card = directory / CARD_FILE
    if not card.is_file():
        return ()
    try:
        labels = json.loads(card.read_text()).get("labels")
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidAdapter(f"{CARD_FILE} is not valid JSON: {exc}", param="lora_path") from None
    if labels is None:
        return ()
    if (
        not isinstance(labels, list)
        or not 2 <= len(labels) <= 1024
        or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise InvalidAdapter(
            f"{CARD_FILE} labels must be 2..1024 distinct non-empty strings", param="lora_path"
        )
    return tuple(labels)
