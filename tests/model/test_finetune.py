"""Fine-tuning a LoRA classifier: the output directory, its card, its validity, and bad input.

Training runs on the tiny seeded BERT of ``conftest.py`` with a handful of generated rows and
one epoch, so each run takes seconds; the numbers it reaches are not the point here (the demo
datasets in ``models/data`` are). Bad input must fail before any model is loaded.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from models.adapters import base_weight_shapes, validate_adapter
from models.adapters.config import CARD_FILE
from models.sources import sha256_file
from models.training.data import stratified_split
from models.training.evaluation import classification_metrics
from models.training.finetune import FinetuneSettings, finetune, main

SUBJECTS = ["the council", "the team", "the lab", "the bank", "our town", "the club", "the firm", "the station"]
LABELS = {"world": "{s} talks peace at the border summit", "sports": "{s} wins the cup final on penalties",
          "science": "{s} finds a new comet with the telescope"}
EXPECTED_FILES = {"adapter_config.json", "adapter_model.safetensors", CARD_FILE, "README.md"}


def rows(labels=LABELS, per_label=8, offset=0) -> list[dict]:
    return [{"text": t.format(s=SUBJECTS[(i + offset) % len(SUBJECTS)]) + f" ({i + offset})", "label": lab}
            for lab, t in labels.items() for i in range(per_label)]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def write_csv(path: Path, items: list[dict], columns=("text", "label")) -> Path:
    lines = [",".join(columns)] + [f'"{r["text"]}",{r["label"]}' for r in items]
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "16", "--rank", "4"]


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """One CLI run (train + eval file, explicit hub id); tempfile's folder is watched for leftovers."""
    root = tmp_path_factory.mktemp("finetune")
    train = write_jsonl(root / "train.jsonl", rows())
    test = write_jsonl(root / "test.jsonl", rows(per_label=3, offset=100))
    scratch = root / "scratch"
    scratch.mkdir()
    out = root / "store" / "topics"
    argv = ["--train", str(train), "--eval", str(test), "--out", str(out), "--base", str(tiny_models["embed"]),
            "--base-hub-id", "example/tiny-bert", *FAST]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(scratch))
        assert main(argv) == 0
    return {"out": out, "train": train, "test": test, "argv": argv, "scratch": scratch}


def test_writes_safetensors_only_and_cleans_up(trained):
    files = {p.name for p in trained["out"].rglob("*")}
    assert files == EXPECTED_FILES
    assert list(trained["scratch"].iterdir()) == []  # Trainer checkpoints and datasets cache are gone
    assert [p.name for p in trained["out"].parent.iterdir()] == ["topics"]  # no staging folder left
    umask = os.umask(0o022)
    os.umask(umask)
    for f in trained["out"].iterdir():  # readable by a server running as another user
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_card_records_labels_metrics_data_and_command(trained):
    card = json.loads((trained["out"] / CARD_FILE).read_text())
    assert card["labels"] == ["science", "sports", "world"]  # sorted: stable ids
    assert card["base"]["hub_id"] == "example/tiny-bert"
    assert card["data"]["train"][0]["sha256"] == sha256_file(trained["train"])
    assert card["data"]["eval"][0]["sha256"] == sha256_file(trained["test"])
    assert card["command"] == "python -m models.training.finetune " + " ".join(trained["argv"])
    assert card["settings"]["rank"] == 4 and card["settings"]["epochs"] == 1
    assert [e["epoch"] for e in card["metrics"]["epochs"]] == [1]
    assert {"validation_accuracy", "validation_macro_f1"} <= set(card["metrics"]["epochs"][0])
    held = card["metrics"]["held_out"]["test"]  # named after the eval file
    adapter = held["adapter"]
    assert adapter["rows"] == 9 and 0 <= adapter["accuracy"] <= 1 and 0 <= adapter["macro_f1"] <= 1
    assert np.array(adapter["confusion"]).sum() == 9 and np.array(adapter["confusion"]).shape == (3, 3)
    assert np.trace(np.array(adapter["confusion"])) == round(adapter["accuracy"] * 9)
    # every label has 8 training rows: the majority class is the first in order, right on 3 of 9
    assert card["metrics"]["majority_label"] == "science" and held["majority"]["accuracy"] == round(3 / 9, 4)
    # 10% of 8 rows per label is 0: the validation floor takes 2 (a third at most)
    assert card["rows"] == {"train": 18, "validation": 6, "test": 9}
    assert "floor" in card["validation"]
    readme = (trained["out"] / "README.md").read_text()
    assert "base_model: example/tiny-bert" in readme and card["data"]["train"][0]["sha256"] in readme
    assert "| test | 9 | majority class (`science`) | 0.3333 |" in readme


def test_adapter_config_names_the_hub_id(trained):
    cfg = json.loads((trained["out"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "example/tiny-bert"
    assert cfg["task_type"] == "SEQ_CLS" and cfg["r"] == 4
    assert "classifier" in cfg["modules_to_save"]


def test_validate_adapter_accepts_the_output(trained, tiny_models):
    out = trained["out"]
    check = validate_adapter(str(out), [out.parent], base_shapes=base_weight_shapes(tiny_models["embed"]),
                             task="classify", max_rank=64)
    assert check.rank == 4 and check.task_type == "SEQ_CLS"
    assert any(m.endswith("attention.self.query") for m in check.target_modules)


def test_adapter_loads_with_peft_and_keeps_the_head(trained, tiny_models):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with safe_open(str(trained["out"] / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["embed"], num_labels=3)
    model = PeftModel.from_pretrained(base, trained["out"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["embed"])
    with torch.no_grad():
        logits = model(**tok(["the club wins the cup"], return_tensors="pt")).logits  # [1, labels]
    assert logits.shape == (1, 3)


def test_csv_without_eval_file_splits_a_held_out_set(tiny_models, tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(per_label=10))
    settings = FinetuneSettings(epochs=1, batch_size=8, max_length=16, rank=2, eval_fraction=0.2)
    card = finetune(train, tmp_path / "out", base=str(tiny_models["embed"]), settings=settings)
    assert card["rows"] == {"train": 18, "validation": 6, "held_out": 6}  # 2 per label held out
    assert card["base"]["hub_id"] is None and "eval" not in card["data"]
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(tiny_models["embed"]).resolve())


def test_overwrite_replaces_the_whole_directory(tiny_models, tmp_path):
    out = tmp_path / "store" / "adapter"
    out.mkdir(parents=True)
    (out / "old_adapter.bin").write_text("stale pickle")
    train = write_jsonl(tmp_path / "train.jsonl", rows(per_label=6))
    settings = FinetuneSettings(epochs=1, batch_size=8, max_length=16, rank=2)
    finetune(train, out, base=str(tiny_models["embed"]), settings=settings, overwrite=True)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def _bad(tmp: Path, case: str) -> dict:
    """Arguments to ``finetune`` for one kind of bad input."""
    good = write_jsonl(tmp / "good.jsonl", rows())
    kw: dict = {"train_file": good, "out_dir": tmp / "out"}
    if case == "missing train file":
        kw["train_file"] = tmp / "nope.jsonl"
    elif case == "missing eval file":
        kw["eval_file"] = tmp / "nope.csv"
    elif case == "unknown extension":
        kw["train_file"] = tmp / "data.txt"
        kw["train_file"].write_text("text,label\n")
    elif case == "missing column (jsonl)":
        kw["train_file"] = write_jsonl(tmp / "x.jsonl", [{"sentence": r["text"], "label": r["label"]} for r in rows()])
    elif case == "missing column (csv)":
        kw["train_file"] = write_csv(tmp / "x.csv", rows(), columns=("text", "category"))
    elif case == "labels are not strings":
        kw["train_file"] = write_jsonl(tmp / "x.jsonl", [{"text": r["text"], "label": i % 2} for i, r in enumerate(rows())])
    elif case == "empty text":
        kw["train_file"] = write_jsonl(tmp / "x.jsonl", rows() + [{"text": "  ", "label": "world"}])
    elif case == "one label":
        kw["train_file"] = write_jsonl(tmp / "x.jsonl", rows({"world": LABELS["world"]}))
    elif case == "eval label unseen in train":
        kw["eval_file"] = write_jsonl(tmp / "e.jsonl", rows({"business": "{s} posts a profit"}, per_label=2))
    elif case == "not JSONL":
        kw["train_file"] = tmp / "x.jsonl"
        kw["train_file"].write_text('{"text": "fine", "label": "world"}\ntext,label\n')
    elif case == "not UTF-8":
        kw["train_file"] = tmp / "x.jsonl"
        kw["train_file"].write_bytes(b'{"text": "caf\xe9", "label": "world"}\n')
    elif case == "malformed CSV":
        kw["train_file"] = tmp / "x.csv"
        kw["train_file"].write_text('text,label\n"unclosed,world\nfine,sports,extra,fields\n')
    elif case == "held-out set lacks a label":
        kw["eval_file"] = write_jsonl(tmp / "e.jsonl", rows({"world": LABELS["world"]}, per_label=3))
    elif case == "eval files with one name":
        (tmp / "a").mkdir()
        kw["eval_file"] = [write_jsonl(tmp / "e.jsonl", rows(per_label=2)), write_jsonl(tmp / "a" / "e.jsonl", rows(per_label=2))]
    elif case == "vader on topic labels":
        kw["baselines"] = ["vader"]
    elif case == "too few rows for validation":
        kw["train_file"] = write_jsonl(tmp / "x.jsonl", rows(per_label=2))
        kw["eval_file"] = write_jsonl(tmp / "e.jsonl", rows(per_label=1, offset=50))
    elif case == "given labels miss a train label":
        kw["settings"] = FinetuneSettings(labels=("world", "sports"))
    elif case == "output path is a file":
        (tmp / "out").write_text("x")
    elif case == "output directory not empty":
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("x")
    kw["base"] = str(tmp / "no-model-here")  # bad input must be caught before the base is needed
    return kw


BAD = [
    ("missing train file", "nope.jsonl' does not exist"),
    ("missing eval file", "nope.csv' does not exist"),
    ("unknown extension", "extension '.txt' is not one of"),
    ("missing column (jsonl)", "lacks column(s) ['text']"),
    ("missing column (csv)", "lacks column(s) ['label']"),
    ("labels are not strings", "column 'label' holds int64"),
    ("empty text", "column 'text' is empty in 1 row(s), the first is row 24"),
    ("one label", "need at least 2 distinct labels, got ['world']"),
    ("eval label unseen in train", "eval labels ['business'] do not occur in the train labels"),
    ("given labels miss a train label", "train labels ['science'] are not among the given labels"),
    ("not JSONL", "is not JSONL: line 2: Expecting value"),
    ("not UTF-8", "is not UTF-8 text"),
    ("malformed CSV", "could not be read as CSV"),
    ("held-out set lacks a label", "held-out set 'e' has no rows labelled ['science', 'sports']"),
    ("eval files with one name", "eval files need distinct names"),
    ("vader on topic labels", "the vader baseline needs the labels ['negative', 'positive']"),
    ("too few rows for validation", "too few for a validation split"),
    ("output path is a file", "exists and is a file"),
    ("output directory not empty", "exists and is not empty"),
]


@pytest.mark.parametrize("case,message", BAD, ids=[c for c, _ in BAD])
def test_bad_input_raises_a_clear_error(tmp_path, case, message):
    with pytest.raises(ValueError) as err:
        finetune(**_bad(tmp_path, case))
    assert message in str(err.value)


@pytest.mark.parametrize("field,value", [("rank", 0), ("epochs", 0), ("learning_rate", -1.0), ("max_length", 4),
                                         ("validation_fraction", 0.6), ("target_modules", ())])
def test_settings_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneSettings(**{field: value})


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, capsys):
    assert main(["--train", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err


def test_macro_f1_matches_a_hand_computed_case():
    logits = np.eye(3)[[0, 0, 1, 2, 2, 2]]  # predictions 0 0 1 2 2 2
    truth = np.array([0, 1, 1, 2, 2, 0])
    m = classification_metrics(logits, truth)
    # per-class F1: 0 -> tp1 fp1 fn1 = 0.5; 1 -> tp1 fp0 fn1 = 2/3; 2 -> tp2 fp1 fn0 = 0.8
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_stratified_split_is_seeded_disjoint_and_keeps_every_label():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    kept, cut = stratified_split(labels, 0.2, seed=3)
    assert (kept, cut) == stratified_split(labels, 0.2, seed=3)
    assert sorted(kept + cut) == list(range(len(labels))) and not set(kept) & set(cut)
    assert sorted(labels[i] for i in cut) == ["a", "a", "b"]
    assert {labels[i] for i in kept} == {"a", "b", "c"}


def test_training_twice_gives_the_same_bytes(trained, tmp_path):
    """Seeded splits, initialisation and shuffling: a second run writes the same weights (what
    `make adapters` relies on; `make reproduce` checks the shipped adapters themselves)."""
    argv = list(trained["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv) == 0
    assert sha256_file(tmp_path / "again" / "adapter_model.safetensors") == \
        sha256_file(trained["out"] / "adapter_model.safetensors")


def test_small_data_gets_a_validation_split_worth_scoring(tiny_models, tmp_path, capsys):
    """60 rows: 10% would leave 3 validation rows; the floor gives 8 per label, and says so."""
    two = {"world": LABELS["world"], "sports": LABELS["sports"]}
    train = write_jsonl(tmp_path / "train.jsonl", rows(two, per_label=30))
    argv = ["--train", str(train), "--out", str(tmp_path / "out"), "--base", str(tiny_models["embed"]), *FAST]
    assert main(argv) == 0
    card = json.loads((tmp_path / "out" / CARD_FILE).read_text())
    assert card["rows"] == {"train": 32, "validation": 16, "held_out": 12}
    out = capsys.readouterr().out
    assert "raised to a floor of 8" in out and "majority class" in out and "Confusion matrix" in out
