"""The ``Backend`` of a generative base: a local Hugging Face causal LM (Llama, Qwen2, GPT-2 and
other families transformers loads with ``AutoModelForCausalLM``), its tokenizer and chat
template, LoRA adapters in stacked slots, and the ``DecodeEngine`` that batches its sequences.

Prompts: a completion prompt is tokenized with the model's special tokens (what
``tokenizer(text)`` gives); a chat is the tokenizer's own chat template with the generation
prompt. Safetensors only, no remote code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.backend import Backend, max_input_tokens
from models.decoding.engine import DecodeEngine
from models.errors import InvalidRequest, ModelLoadError, TaskNotSupported
from models.lora_slots import LoraEncoder, SlotAdapters
from models.weight_layout import column_major_linear_weights


class GenerativeBackend(SlotAdapters, Backend):
    variant = "torch"

    def load(self) -> None:
        if self.spec.torch_threads:
            torch.set_num_threads(self.spec.torch_threads)
        kw = dict(local_files_only=True, trust_remote_code=False)
        try:
            config = AutoConfig.from_pretrained(self.path, **kw)
            tokenizer = AutoTokenizer.from_pretrained(self.path, use_fast=True, **kw)
            model = AutoModelForCausalLM.from_pretrained(self.path, use_safetensors=True, **kw).eval()
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"cannot load model {self.spec.id!r} from {self.path}: {exc}") from exc
        try:
            gen = GenerationConfig.from_pretrained(self.path, **kw)
        except OSError:
            gen = GenerationConfig.from_model_config(config)
        eos = {i for x in (gen.eos_token_id, config.eos_token_id, tokenizer.eos_token_id)
               for i in (x if isinstance(x, list) else [x]) if i is not None}
        self.tokenizer = tokenizer
        self.context = max_input_tokens(self.spec, self.path, tokenizer, config)
        column_major_linear_weights(model)  # decode passes of 32 rows: see models/weight_layout.py
        self.lora = LoraEncoder(model, slots=self.spec.adapters.adapters_per_replica)
        g = self.spec.generation
        self.engine = DecodeEngine(
            model, tokenizer, self.lora, context=self.context, max_running=g.max_running,
            max_waiting=g.max_waiting, step_tokens=g.step_tokens, eos=eos,
            prefix_cache_bytes=int(g.prefix_cache_mb * 2**20),
        )

    # -- prompts --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """A completion prompt: text (with the model's special tokens) or token ids as given."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad!r} is outside this model's vocabulary [0, {vocab})", param="prompt")
        if not ids:
            raise InvalidRequest("the prompt is empty (this tokenizer adds no start token)", param="prompt")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TaskNotSupported(f"model {self.spec.id!r} has no chat template; use /v1/completions", param="model")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template may raise on content it does not accept
            raise InvalidRequest(f"the chat template cannot render these messages: {exc}", param="messages") from None
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- adapters ---------------------------------------------------------------------------------
    def predict(self, rows, adapters=None):
        raise TaskNotSupported(f"model {self.spec.id!r} generates text; it has no embeddings or classes")

    def close(self) -> None:
        super().close()
        self.engine = None
        self.lora = None
