"""Build the default generative base: a small Llama trained here on ``corpus`` text.

Steps, all seeded: write the corpus (stories, and dialogues through ``CHAT_TEMPLATE``); train a
byte-level BPE tokenizer on it with the ``tokenizers`` library; train a Llama-architecture
causal LM (``SIZE``: a few million parameters) on packed 128-token blocks with AdamW and a
cosine schedule for ``steps``; save it as a Hugging Face directory (safetensors, tokenizer with
its chat template) that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load like any other.
The command line runs with the pinned CPU kernels of ``models.machine``::

    python -m models.generative.build --out models/data/storyteller
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from models.generative.corpus import dialogues, stories
from models.machine import pinned

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# What a served chat prompt starts with: the ``<s>`` every training text began with.
SERVED_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
SIZE = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "rope_theta": 10000.0}
BLOCK = 128


def corpus_texts(n_stories: int = 20000, n_dialogues: int = 8000) -> list[str]:
    from jinja2 import Template

    chat = Template(CHAT_TEMPLATE)
    return stories(n_stories, seed=0) + [chat.render(messages=d, add_generation_prompt=False)
                                         for d in dialogues(n_dialogues, seed=1)]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    with_bos(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=SERVED_CHAT_TEMPLATE,
                                   additional_special_tokens=SPECIAL[4:], model_max_length=SIZE["max_position_embeddings"])


def with_bos(tok) -> None:
    """Texts encoded with special tokens start with ``<s>``, as every training text did (the
    training itself encodes without them and adds ``<s>``/``</s>`` per text, ``blocks``)."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL.index("<s>"))])


def blocks(tokenizer, texts: list[str]):
    """Every text as ``<s> ... </s>``, concatenated and cut into BLOCK-token rows."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    n = len(ids) // BLOCK
    return torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)


SAMPLE_PROMPTS = ["Once upon a time", "<|user|>\nWrite a short story about a fox named Leo.</s>\n<|assistant|>\n"]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def build(out: Path, steps: int = 800, batch: int = 32, lr: float = 3e-3, seed: int = 0, say=print,
          texts: list[str] | None = None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    texts = texts if texts is not None else corpus_texts()
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, SIZE["vocab_size"])
    data = blocks(tokenizer, texts)  # [rows, BLOCK]
    held = data[-64:]  # the last rows: held out, for the loss the card reports
    data = data[:-64]
    config = LlamaConfig(**SIZE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    say(f"{params / 1e6:.1f}M parameters, {data.numel() / 1e6:.2f}M training tokens, {steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            say(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    with torch.no_grad():
        held_loss = float(model(input_ids=held, labels=held).loss)
    # the simplest baseline: each next token drawn from the training tokens' frequencies
    counts = torch.bincount(data.flatten(), minlength=config.vocab_size).double() + 1
    unigram = float(-(counts / counts.sum()).log()[held[:, 1:].flatten()].mean())
    samples = {prompt: generate_text(model, tokenizer, prompt) for prompt in SAMPLE_PROMPTS}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    card = {"parameters": params, "steps": steps, "batch": batch, "block": BLOCK, "lr": lr, "seed": seed,
            "training_tokens": int(data.numel()), "held_out_loss": round(held_loss, 4),
            "held_out_perplexity": round(math.exp(held_loss), 2),
            "unigram_perplexity": round(math.exp(unigram), 2), "greedy_samples": samples,
            "seconds": round(time.perf_counter() - started, 1)}
    (out / "build_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.generative.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args(argv)
    pinned("models.generative.build", list(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(build(args.out, steps=args.steps), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
