"""PyTorch implementation of ``Backend`` for encoder tasks (embed, classify).

Embeddings are computed exactly as sentence-transformers computes them for its mean-pooling
models: token embeddings averaged over the attention mask, then L2-normalized.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from models.backend import Backend, max_input_tokens
from models.errors import ModelLoadError, TaskNotSupported
from models.tokenization import InputEncoder


class TorchBackend(Backend):
    variant = "torch"

    def load(self) -> None:
        if self.spec.torch_threads:
            torch.set_num_threads(self.spec.torch_threads)
        kw = dict(local_files_only=True, trust_remote_code=False)
        try:
            config = AutoConfig.from_pretrained(self.path, **kw)
            tokenizer = AutoTokenizer.from_pretrained(self.path, use_fast=True, **kw)
            if self.spec.task == "embed":
                model = AutoModel.from_pretrained(self.path, use_safetensors=True, **kw)
                self.dimensions = int(config.hidden_size)
            elif self.spec.task == "classify":
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.path, use_safetensors=True, **kw
                )
                self.labels = tuple(config.id2label[i] for i in range(config.num_labels))
            else:
                raise TaskNotSupported(f"the torch encoder backend does not serve {self.spec.task!r}")
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load model {self.spec.id!r} from {self.path}: {exc}") from exc
        self.model = model.eval()
        self.encoder = InputEncoder(tokenizer, max_input_tokens(self.spec, self.path, tokenizer, config))

    @torch.inference_mode()
    def predict(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = _pad(rows, self.encoder.pad_id)  # [batch, seq] each
        if self.spec.task == "classify":
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [batch, labels]
            return torch.softmax(logits.float(), dim=-1).numpy()
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, s, h]
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [batch, hidden]
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()

    def close(self) -> None:
        super().close()
        self.model = None


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
