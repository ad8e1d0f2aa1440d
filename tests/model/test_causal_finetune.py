"""Fine-tuning a LoRA adapter for generation (``loraserve train --task generate``): the files and
the card (held-out loss and exact match, adapter against base), loss on the completion only,
the adapter served by the decode engine exactly as peft generates with it, and bad input.

A short run (a slice of the endings data, one epoch) on the shipped storyteller: the numbers
are not the point here, the shipped demo adapter's card is (tests/model/test_storyteller.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.adapters import base_weight_shapes, validate_adapter
from models.adapters.config import CARD_FILE
from models.training.finetune import main
from models.training.sft_data import IGNORE, encode, read_sft
from tests.conftest import STORYTELLER, greedy_reference

DATA = Path("models/data/endings")
FAST = ["--epochs", "1", "--batch-size", "8", "--rank", "4", "--max-length", "160"]


def head(src: Path, dest: Path, n: int) -> Path:
    dest.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    train = head(DATA / "train.jsonl", root / "train.jsonl", 96)
    test = head(DATA / "test.jsonl", root / "test.jsonl", 6)
    out = root / "store" / "ending"
    status = main(["--task", "generate", "--train", str(train), "--eval", str(test), "--out", str(out), *FAST],
                  prog="loraserve train")
    assert status == 0
    return out, json.loads((out / CARD_FILE).read_text())


def test_writes_a_servable_adapter_with_its_card(trained):
    out, card = trained
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", CARD_FILE, "README.md"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert card["task"] == "generate" and card["rows"]["test"] == 6
    held = card["metrics"]["held_out"]["test"]
    for who in ("adapter", "base"):
        assert held[who]["rows"] == 6 and 0 <= held[who]["exact_match"] <= 1 and held[who]["loss"] > 0
    assert held["adapter"]["loss"] < held["base"]["loss"]  # even one short epoch learns the format
    assert card["metrics"]["samples"]["test"][0]["expected"].endswith(".")
    check = validate_adapter(out.name, [out.parent], base_shapes=base_weight_shapes(Path(STORYTELLER)),
                             task=None, base_task="generate", max_rank=64)
    assert check.task == "generate"
    assert "exact match" in (out / "README.md").read_text()


def test_the_served_engine_generates_what_peft_generates_with_it(trained):
    from models.decoding.engine import GenSeq
    from models.decoding.sampling import SamplingParams
    from models.factory import create_backend
    from models.spec import ModelSpec

    out, _ = trained
    b = create_backend(ModelSpec(id="storyteller", source=STORYTELLER, task="generate"), "torch")
    b.load()
    check = validate_adapter(out.name, [out.parent], base_shapes=base_weight_shapes(Path(STORYTELLER)),
                             task="generate", max_rank=64)
    b.add_adapter("ending", check, "generate")
    row = read_sft(DATA / "test.jsonl")[10]
    prompt = b.encode_chat(row["messages"])
    seqs = [GenSeq(prompt, SamplingParams(24, 0.0), a) for a in ("ending", None)]
    b.engine.admit(seqs)
    while b.engine.busy:
        b.engine.step()
    assert seqs[0].tokens == greedy_reference(prompt, 24, adapter_dir=out)
    assert seqs[1].tokens == greedy_reference(prompt, 24)


def test_the_loss_covers_the_completion_only():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORYTELLER)
    rows = [{"prompt": "Once upon a time", "messages": None, "completion": " there was a cat."}]
    enc = encode(tok, rows, 64, "train")
    prompt = tok("Once upon a time")["input_ids"]
    assert enc["labels"][0][: len(prompt)] == [IGNORE] * len(prompt)
    assert enc["labels"][0][len(prompt):] == enc["input_ids"][0][len(prompt):]
    assert enc["input_ids"][0][-1] == tok.eos_token_id  # the adapter learns to stop


BAD = [
    ("not JSON", "{oops\n", "line 1 is not JSON"),
    ("no completion", '{"prompt": "hi"}\n', "needs string `prompt` and non-empty `completion`"),
    ("chat ends with the user", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     "the last message must be the assistant's answer"),
    ("unknown role", '{"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     "each message needs a role"),
    ("too long for max_length", (json.dumps({"prompt": "word " * 300, "completion": "x"}) + "\n") * 30,
     "max_length is 160"),
    ("empty file", "\n", "has no rows"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_training_data_exits_2_naming_the_problem(tmp_path, capsys, name, text, message):
    train = tmp_path / "train.jsonl"
    train.write_text(text)
    status = main(["--task", "generate", "--train", str(train), "--out", str(tmp_path / "out"), *FAST])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
