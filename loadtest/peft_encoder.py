"""The peft way to serve LoRA adapters on a torch encoder: the baseline of
``loadtest/bench_lora_impl.py`` (the service uses slots, ``models.LoraEncoder``).

The served encoder (``BertModel``-shaped: ``last_hidden_state`` + ``pooler_output``) is wrapped
in one ``PeftModel`` the first time an adapter arrives. Each adapter's LoRA matrices are loaded
from its safetensors (names mapped onto the served module tree, so an adapter trained on
``BertForSequenceClassification`` -- ``bert.encoder...`` -- fits a ``BertModel`` checkpoint), and
its classification head (peft's ``modules_to_save``) is kept here as ``(weight, bias, labels)``
(``models.classifier_head``), as ``BertForSequenceClassification`` applies it over the pooled
output.

One forward pass serves rows of different adapters and of the bare base: peft's
``adapter_names`` (``"__base__"`` for the base) selects each row's LoRA path inside every layer;
then each row gets its own output: pooled embedding, or its adapter's head and a softmax. Heads
of different widths are why ``predict`` returns one array per row.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from models import WEIGHTS_FILE, AdapterCheck, InvalidAdapter, classifier_head, served_module_name

BASE = "__base__"


def split_state(check: AdapterCheck, module_names: set[str]) -> tuple[dict, dict]:
    """Adapter tensors -> (LoRA state in peft's saved naming for the served model, head tensors)."""
    lora, head = {}, {}
    for key, tensor in load_file(check.path / WEIGHTS_FILE).items():
        key = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            marker = ".lora_A." if ".lora_A." in key else ".lora_B."
            module, rest = key.split(marker)
            lora[f"base_model.model.{served_module_name(module, module_names)}{marker}{rest}"] = tensor
        else:
            head[key.replace(".modules_to_save.default", "")] = tensor
    return lora, head


class PeftEncoder:
    """The served encoder plus its loaded adapters."""

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder  # the plain model until the first adapter arrives
        self.peft = None
        self._modules = {name for name, _ in encoder.named_modules()}
        self.heads: dict[str, tuple] = {}
        self.tasks: dict[str, str] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.encoder

    def add(self, name: str, check: AdapterCheck, task: str, labels: tuple[str, ...] = ()) -> None:
        if name == BASE or name in self.tasks:
            raise InvalidAdapter(f"adapter name {name!r} is already loaded here", param="lora_name")
        lora, head = split_state(check, self._modules)
        targets = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in lora})
        cfg = LoraConfig(
            r=check.rank,
            lora_alpha=check.alpha,
            target_modules=targets,
            lora_dropout=0.0,
            use_rslora=check.use_rslora,
            inference_mode=True,
        )
        new_head = classifier_head(head, labels) if task == "classify" else None
        if self.peft is None:
            self.peft = get_peft_model(self.encoder, cfg, adapter_name=name)
        else:
            self.peft.add_adapter(name, cfg)
        result = set_peft_model_state_dict(self.peft, lora, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing:
            self.peft.delete_adapter(name)
            raise InvalidAdapter(f"adapter {name!r} lacks weights for {missing[:3]}", param="lora_path")
        self.peft.eval()
        self.tasks[name] = task
        if new_head is not None:
            self.heads[name] = new_head

    def remove(self, name: str) -> None:
        if name not in self.tasks:
            return
        self.tasks.pop(name)
        self.heads.pop(name, None)
        if self.tasks:
            self.peft.delete_adapter(name)
        else:  # the last one: take the LoRA layers out again, back to the plain encoder
            self.encoder = self.peft.unload()
            self.peft = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, adapters: list[str | None]):
        """One pass; returns the encoder output (``last_hidden_state``, ``pooler_output``)."""
        if self.peft is None:
            return self.encoder(input_ids=ids, attention_mask=mask)
        names = [a if a is not None else BASE for a in adapters]
        return self.peft(input_ids=ids, attention_mask=mask, adapter_names=names)
