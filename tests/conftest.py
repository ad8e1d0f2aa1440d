"""Shared fixtures: tiny deterministic models written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOPIC_LABELS = ("world", "sports", "business", "science")

# Integration tests that start a service (or a cluster) of their own. They run first, before the
# session's shared service starts (at its first use, living to the end of the run): on 2 cores an
# idle Ray beside them slows their start-ups (measured once: the cluster set-up took 138 s in a full
# run, 77 s alone).
OWN_SERVICE = ("test_cli.py", "test_cluster.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    first = [i for i in items if i.path.name in OWN_SERVICE]
    if first:
        items[:] = first + [i for i in items if i.path.name not in OWN_SERVICE]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny BERT embedder and a tiny 4-label classifier (seeded)."""
    from models.tiny import build_tiny_bert

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "embed": build_tiny_bert(root / "tiny-embed", task="embed", seed=1),
        "classify": build_tiny_bert(root / "tiny-cls", task="classify", labels=TOPIC_LABELS, seed=2),
    }


def make_adapter(base_dir, dest, *, task: str, rank: int = 4, seed: int = 0, targets=("query", "value")):
    """A real peft LoRA adapter on a tiny base, saved with ``save_pretrained`` (safetensors).

    peft initializes ``lora_B`` to zeros (a no-op adapter); the matrices are randomized with a
    seed so an adapter visibly changes outputs and cross-talk between adapters would show.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classify":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir)
        task_type = "SEQ_CLS"
    else:
        model = AutoModel.from_pretrained(base_dir)
        task_type = "FEATURE_EXTRACTION"
    cfg = LoraConfig(task_type=task_type, r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(dest, safe_serialization=True)
    return dest


def peft_reference(base_dir, adapter_dir, task, texts, tokenizer=None):
    """What peft itself computes for ``texts`` with one adapter: class probabilities, or
    mean-pooled L2-normalized embeddings. The reference every served output is held to."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_dir)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        if task == "classify":
            model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir).eval()
            return torch.softmax(model(**enc).logits, -1).numpy()
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1).numpy()


STORYTELLER = "models/data/storyteller"


def make_causal_adapter(dest, *, base_dir=STORYTELLER, rank: int = 4, seed: int = 0,
                        targets=("q_proj", "v_proj"), std: float = 0.2):
    """A real peft CAUSAL_LM LoRA adapter on a causal LM, randomized with a seed (see
    ``make_adapter``) so that it changes what greedy decoding writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(dest, safe_serialization=True)
    return dest


def greedy_reference(prompt_ids, max_new_tokens, *, base_dir=STORYTELLER, adapter_dir=None):
    """``model.generate(do_sample=False)`` of transformers (through peft for an adapter): the
    token ids the served engine must reproduce, up to and excluding the end-of-text token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=model.config.pad_token_id)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[: ids.index(eos)] if eos in ids else ids
