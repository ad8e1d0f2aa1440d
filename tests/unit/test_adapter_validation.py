"""Adapter validation before anything is loaded: one test case per kind of bad adapter.

Adapters here are real peft LoRA adapters on the tiny seeded BERTs, written by
``save_pretrained``; the bad ones are made by damaging copies of them.
"""

import json
import os
import shutil

import pytest

from models.adapters import WEIGHTS_FILE, base_weight_shapes, validate_adapter
from models.errors import InvalidAdapter
from tests.conftest import make_adapter


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-store")
    make_adapter(tiny_models["classify"], root / "topics-lora", task="classify")
    make_adapter(tiny_models["embed"], root / "embed-lora", task="embed")
    # a classifier adapter trained on the embedder's weights (prefix `bert.` vs none)
    make_adapter(tiny_models["embed"], root / "cls-on-embed-base", task="classify")
    make_adapter(tiny_models["classify"], root / "rank16", task="classify", rank=16)
    return root


@pytest.fixture(scope="module")
def shapes(tiny_models):
    return {k: base_weight_shapes(v) for k, v in tiny_models.items()}


def check(store, shapes, path, *, base="classify", task="classify", max_rank=8, roots=None):
    return validate_adapter(str(path), roots or [store], base_shapes=shapes[base], task=task, max_rank=max_rank)


def damaged(store, name, src="topics-lora"):
    dest = store / name
    if not dest.exists():
        shutil.copytree(store / src, dest)
    return dest


def test_good_adapters_pass_with_what_registration_needs(store, shapes):
    ok = check(store, shapes, "topics-lora")
    assert ok.rank == 4 and ok.task_type == "SEQ_CLS" and ok.size_bytes > 0 and len(ok.sha256) == 64
    assert len(ok.target_modules) == 4  # query + value in 2 layers
    assert "classifier" in ok.modules_to_save
    assert check(store, shapes, store / "embed-lora", base="embed", task="embed").rank == 4
    # compatible by architecture and shapes although its module names carry the `bert.` prefix
    assert check(store, shapes, "cls-on-embed-base", base="embed").rank == 4


def _symlink_out(store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(store / "topics-lora", outside)
    link = store / "escape"
    if not link.exists():
        os.symlink(outside, link)
    return "escape"


def _file(store, name, filename, content=b"x"):
    d = damaged(store, name)
    (d / filename).write_bytes(content)
    return name


def _config(store, name, **changes):
    d = damaged(store, name)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return name


def _weights(store, name, mutate):
    from safetensors.torch import load_file, save_file

    d = damaged(store, name)
    tensors = load_file(d / WEIGHTS_FILE)
    save_file(mutate(tensors), d / WEIGHTS_FILE)
    return name


def _rename_module(t):
    return {k.replace("layer.0.attention.self.query", "layer.0.attention.self.nonexistent"): v for k, v in t.items()}


def _wrong_shape(t):
    import torch

    return {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v) for k, v in t.items()}


BAD = [
    ("absolute path outside", lambda s, t: str(t), "outside every adapter store"),
    ("dot-dot", lambda s, t: "topics-lora/../topics-lora", "must not contain '..'"),
    ("url-encoded dot-dot", lambda s, t: "%2e%2e/%2e%2e/etc", "must not contain '..'"),
    ("symlink leaving the root", _symlink_out, "outside every adapter store"),
    ("missing directory", lambda s, t: "no-such-adapter", "does not exist"),
    ("missing weights", lambda s, t: (os.remove(damaged(s, "noweights") / WEIGHTS_FILE), "noweights")[1], "has no adapter_model.safetensors"),
    ("pickle .bin", lambda s, t: _file(s, "pickle-bin", "adapter_model.bin"), "pickle weights"),
    ("pickle .pt", lambda s, t: _file(s, "pickle-pt", "extra.pt"), "pickle weights"),
    ("python file", lambda s, t: _file(s, "has-py", "modeling_evil.py"), "Python files"),
    ("auto_map", lambda s, t: _config(s, "automap", auto_map={"AutoModel": "evil.Model"}), "auto_map"),
    ("not LoRA", lambda s, t: _config(s, "ia3", peft_type="IA3"), "is not LORA"),
    ("config not JSON", lambda s, t: _file(s, "badjson", "adapter_config.json", b"{nope"), "not valid JSON"),
    ("corrupt safetensors", lambda s, t: _file(s, "corrupt", WEIGHTS_FILE, os.urandom(256)), "not a valid safetensors"),
    ("truncated safetensors", lambda s, t: _file(s, "truncated", WEIGHTS_FILE, (s / "topics-lora" / WEIGHTS_FILE).read_bytes()[:-100]), "past the end"),
    ("rank above the limit", lambda s, t: "rank16", "exceeds this base's limit of 8"),
    ("target module absent", lambda s, t: _weights(s, "absent-module", _rename_module), "does not exist in the base"),
    ("mismatched shapes", lambda s, t: _weights(s, "bad-shape", _wrong_shape), "do not fit the base weight"),
]


@pytest.mark.parametrize("name, make, message", BAD, ids=[b[0] for b in BAD])
def test_bad_adapters_are_refused_with_a_clear_message(store, shapes, tmp_path, name, make, message):
    path = make(store, tmp_path)
    with pytest.raises(InvalidAdapter, match=message) as info:
        check(store, shapes, path)
    assert info.value.code == "invalid_adapter" and info.value.param == "lora_path"


def test_task_the_base_does_not_serve(store, shapes):
    with pytest.raises(InvalidAdapter, match="does not fit a base serving 'embed'"):
        check(store, shapes, "topics-lora", base="embed", task="embed")
