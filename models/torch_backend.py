"""PyTorch implementation of ``Backend`` for encoder tasks (embed, classify), with LoRA adapters.

Embeddings are computed exactly as sentence-transformers computes them for its mean-pooling
models: token embeddings averaged over the attention mask, then L2-normalized. Classification
applies the head over the pooled output as ``BertForSequenceClassification`` does. Adapters
(``models.lora_slots``) may differ per row of one batch; a row's output is then its adapter's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from models.backend import Backend, max_input_tokens
from models.errors import ModelLoadError, TaskNotSupported
from models.lora_slots import Head, LoraEncoder, SlotAdapters
from models.tokenization import InputEncoder
from models.weight_layout import column_major_linear_weights


class TorchBackend(SlotAdapters, Backend):
    variant = "torch"

    def load(self) -> None:
        if self.spec.torch_threads:
            torch.set_num_threads(self.spec.torch_threads)
        kw = dict(local_files_only=True, trust_remote_code=False)
        try:
            config = AutoConfig.from_pretrained(self.path, **kw)
            tokenizer = AutoTokenizer.from_pretrained(self.path, use_fast=True, **kw)
            if self.spec.task == "embed":
                encoder = AutoModel.from_pretrained(self.path, use_safetensors=True, **kw)
                self.dimensions = int(config.hidden_size)
                self.base_head = None
            elif self.spec.task == "classify":
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.path, use_safetensors=True, **kw
                )
                self.labels = tuple(config.id2label[i] for i in range(config.num_labels))
                encoder = model.base_model  # the encoder; the head is applied per row below
                self.base_head = Head(model.classifier.weight.detach(), model.classifier.bias.detach(), self.labels)
            else:
                raise TaskNotSupported(f"the torch encoder backend does not serve {self.spec.task!r}")
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"cannot load model {self.spec.id!r} from {self.path}: {exc}") from exc
        column_major_linear_weights(encoder)
        self.lora = LoraEncoder(encoder.eval(), slots=self.spec.adapters.adapters_per_replica)
        self.encoder = InputEncoder(tokenizer, max_input_tokens(self.spec, self.path, tokenizer, config))

    @torch.inference_mode()
    def predict(
        self, rows: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None
    ) -> np.ndarray | list[np.ndarray]:
        ids, mask = _pad(rows, self.encoder.pad_id)  # [batch, seq] each
        names = list(adapters) if adapters is not None else [None] * len(rows)
        out = self.lora.forward(ids, mask, names)
        # Which output each row gets: its adapter's task (or the base's), and which head.
        kinds = [self._kind(a) for a in names]
        if all(k == kinds[0] for k in kinds):  # uniform batch: one vectorized result
            return self._outputs(kinds[0], out, mask, slice(None)).numpy()
        result: list[np.ndarray | None] = [None] * len(rows)
        for kind in set(kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            values = self._outputs(kind, out, mask, torch.tensor(idx)).numpy()
            for j, i in enumerate(idx):
                result[i] = values[j]
        return result

    def _kind(self, adapter: str | None) -> tuple[str, str | None]:
        if adapter is None:
            return ("embed", None) if self.spec.task == "embed" else ("classify", None)
        task = self.lora.tasks[adapter]
        return (task, adapter if task == "classify" else None)

    def _outputs(self, kind, out, mask, rows) -> torch.Tensor:
        task, head_name = kind
        if task == "classify":
            head = self.base_head if head_name is None else self.lora.heads[head_name]
            pooled = out.pooler_output[rows]  # [rows, hidden]
            logits = pooled.float() @ head.weight.T + head.bias  # [rows, labels]
            return torch.softmax(logits, dim=-1)
        hidden = out.last_hidden_state[rows]  # [rows, seq, hidden]
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask[rows].unsqueeze(-1).to(hidden.dtype)  # [rows, seq, 1]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [rows, hidden]
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float()

    def close(self) -> None:
        super().close()
        self.lora = None


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row of this batch."""
    if not rows:
        raise ModelLoadError("predict called with an empty batch")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # [batch, seq]
    mask = np.zeros((len(rows), width), dtype=np.int64)  # [batch, seq]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
