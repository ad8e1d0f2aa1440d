"""Wire schemas (pydantic) of the HTTP API and the encoders of its responses.

Input types are strict (no number-to-string coercion); unknown fields are ignored, as OpenAI
clients send fields such as ``user``.
"""

from __future__ import annotations

import base64
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

TokenIds = list[StrictInt]
EmbeddingInput = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(description="BASE, ADAPTER or BASE:ADAPTER, optionally @VARIANT.")
    truncate: StrictBool = Field(
        False, description="Cut inputs over the token limit instead of answering 400."
    )

    def inputs(self) -> list:
        """The input as a list of items (a string or a token-id array each)."""
        x = self.input  # type: ignore[attr-defined]
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [x]  # one token-id array
        return list(x)


def _non_empty(v):
    if isinstance(v, list) and len(v) == 0:
        raise ValueError("input must not be an empty list")
    return v


class EmbeddingsRequest(_Request):
    input_shapes: ClassVar[str] = (
        "a string, a list of strings, a token-id array or a list of token-id arrays"
    )
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, description="Keep the first N components.")
    user: StrictStr | None = None

    _check_input = field_validator("input")(_non_empty)


class ClassifyRequest(_Request):
    input_shapes: ClassVar[str] = "a string or a list of strings"
    input: StrictStr | list[StrictStr]

    _check_input = field_validator("input")(_non_empty)


def usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def embeddings_response(model: str, vectors: np.ndarray, fmt: str, tokens: int) -> dict:
    """OpenAI embeddings list; ``vectors`` is ``[rows, dims]`` float32."""
    if fmt == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            for i, v in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": usage(tokens)}


def classify_response(
    request_id: str, created: int, model: str, probs: np.ndarray, labels: tuple[str, ...], tokens: int
) -> dict:
    """vLLM's classify shape; ``probs`` is ``[rows, num_labels]``."""
    data = [
        {"index": i, "label": labels[int(p.argmax())], "probs": p, "num_classes": len(labels)}
        for i, p in enumerate(probs)
    ]
    return {
        "id": f"classify-{request_id}",
        "object": "list",
        "created": created,
        "model": model,
        "data": data,
        "usage": usage(tokens),
    }


class _AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadAdapterRequest(_AdminRequest):
    """vLLM's body for ``POST /v1/load_lora_adapter``, plus ``replace`` and ``pinned``."""

    lora_name: StrictStr = Field(description="The adapter's name in `model` strings.")
    lora_path: StrictStr = Field(description="Directory inside an adapter store root.")
    base_model_name: StrictStr | None = Field(
        None, description="Base model (id or hub id); default: the adapter config's base."
    )
    replace: StrictBool = Field(False, description="Replace an adapter of the same name.")
    pinned: StrictBool = Field(False, description="Never evict it from replicas' LRUs.")


class UnloadAdapterRequest(_AdminRequest):
    """vLLM's body for ``POST /v1/unload_lora_adapter``."""

    lora_name: StrictStr
    lora_int_id: StrictInt | None = Field(None, description="Accepted for vLLM compatibility; unused.")
