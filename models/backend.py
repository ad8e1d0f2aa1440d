"""The one seam between serving and tensors.

``Backend`` is the interface the serving layer talks to; ``models.factory.create_backend`` is
the only place that knows which implementation serves which variant. This module is a leaf: it
imports only errors, specs and tokenization. Lifecycle: construct (cheap, no I/O) ->
``load()`` (reads weights, may take seconds) -> ``predict()`` many times -> ``close()``.

Outputs are numpy arrays so nothing above this layer imports torch:
- embed: ``[rows, hidden]`` float32, pooled (and L2-normalized when the spec says so);
- classify: ``[rows, num_labels]`` float32 class probabilities.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from models.errors import ModelLoadError, TaskNotSupported
from models.spec import ModelSpec
from models.tokenization import Input, InputEncoder


class Backend(ABC):
    """One loaded (base, variant): tokenizer, weights and a ``predict`` over a batch of rows."""

    variant: str = ""
    # May add_adapter/remove_adapter run on another thread while predict runs?
    concurrent_adapter_updates: bool = False

    def __init__(self, spec: ModelSpec, path: Path):
        self.spec = spec
        self.path = path
        self.encoder: InputEncoder | None = None
        self.labels: tuple[str, ...] = ()  # classify: label of each output column
        self.dimensions: int = 0  # embed: width of an embedding

    @abstractmethod
    def load(self) -> None:
        """Read tokenizer and weights; sets ``encoder``, ``labels``/``dimensions``."""

    @abstractmethod
    def predict(self, rows: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None):
        """Run one forward pass over token-id rows (already with special tokens), padding them
        to the longest row of this batch; ``adapters`` names each row's loaded adapter (None:
        the bare base). Returns ``[len(rows), width]`` float32, or one array per row when rows
        of different output widths share the batch."""

    def add_adapter(self, name: str, check, task: str, labels: tuple[str, ...] = ()) -> None:
        """Load a validated adapter (``models.adapters.AdapterCheck``) under ``name``."""
        raise TaskNotSupported(f"the {self.variant} backend does not serve adapters")

    def remove_adapter(self, name: str) -> None:
        """Free an adapter; only called when no batch in flight uses it."""
        raise TaskNotSupported(f"the {self.variant} backend does not serve adapters")

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters loaded in this backend."""
        return []

    def watched_files(self) -> list[Path]:
        """Files whose replacement should reload this backend (ONNX graphs); none for torch."""
        return []

    def file_digests(self) -> dict[str, str]:
        """sha256 of each file this backend opened, by name (reported in ``/v1/models``)."""
        return {}

    def encode(self, inputs: Sequence[Input], *, truncate: bool = False) -> list[list[int]]:
        if self.encoder is None:
            raise ModelLoadError(f"model {self.spec.id!r} is not loaded")
        return self.encoder.encode(inputs, truncate=truncate)

    def close(self) -> None:
        """Release weights; the backend must not be used afterwards."""
        self.encoder = None


def max_input_tokens(spec: ModelSpec, path: Path, tokenizer, config) -> int:
    """The spec's limit, else sentence-transformers' max_seq_length, else the model's own."""
    if spec.max_input_tokens:
        return spec.max_input_tokens
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        return int(json.loads(st_cfg.read_text())["max_seq_length"])
    limits = [getattr(config, "max_position_embeddings", None)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 1_000_000:
        limits.append(tok_max)
    limits = [x for x in limits if x]
    if not limits:
        raise ModelLoadError(f"cannot tell the input limit of {spec.id!r}; set max_input_tokens")
    return int(min(limits))
