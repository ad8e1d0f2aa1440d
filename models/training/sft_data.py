"""Supervised fine-tuning data for a causal LM: JSONL rows of ``{"prompt", "completion"}`` or
``{"messages": [...]}`` (a chat whose last message is the assistant's answer), tokenized so that
the loss covers the completion only.

- A prompt is tokenized as the server tokenizes a completion prompt (``tokenizer(prompt)``, with
  the model's special tokens); a chat's prompt is the chat template over every message but the
  last, with the generation prompt, as the server renders ``/v1/chat/completions``. So the
  adapter is trained on exactly what it will be served.
- The completion is followed by the end-of-text token, so the adapter learns to stop.
- ``labels`` are -100 over the prompt (and padding): the loss is the completion's alone.
- A row whose prompt leaves no room for its completion within ``max_length`` is an error naming
  the row, not a silent truncation.
"""

from __future__ import annotations

import json
from pathlib import Path

IGNORE = -100
ROLES = ("system", "user", "assistant")


def read_sft(path: Path) -> list[dict]:
    """Rows as ``{"prompt": str | None, "messages": list | None, "completion": str}``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"data file {str(path)!r}: generation data must be JSONL (.jsonl)")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"data file {str(path)!r} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON: {exc.msg}") from None
        rows.append(_row(row, where))
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    return rows


def _row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not an object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise ValueError(f"{where}: messages must be a list of at least two messages")
        for m in msgs:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: each message needs a role ({', '.join(ROLES)}) and string content")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise ValueError(f"{where}: the last message must be the assistant's answer")
        return {"prompt": None, "messages": msgs[:-1], "completion": msgs[-1]["content"]}
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
        raise ValueError(f"{where}: needs string `prompt` and non-empty `completion` (or `messages`)")
    return {"prompt": prompt, "messages": None, "completion": completion}


def prompt_ids(tokenizer, row: dict) -> list[int]:
    if row["messages"] is not None:
        return list(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True))
    return tokenizer(row["prompt"])["input_ids"]


def encode(tokenizer, rows: list[dict], max_length: int, name: str) -> dict[str, list]:
    """Columns ``input_ids``, ``labels`` (and the prompt's ids, for generation at evaluation)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "completion": []}
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        p = prompt_ids(tokenizer, row)
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(p) + len(c) > max_length:
            raise ValueError(f"{name} row {i + 1}: prompt and completion are {len(p) + len(c)} tokens; "
                             f"max_length is {max_length}")
        out["input_ids"].append(p + c)
        out["labels"].append([IGNORE] * len(p) + c)
        out["prompt_ids"].append(p)
        out["completion"].append(row["completion"])
    return out
