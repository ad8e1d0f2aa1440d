"""Model specifications: what a base model is and how it may be served.

A ``ModelSpec`` is read from configuration once and passed down; nothing in the model layer
reads the environment. Every field carries a description because these objects are the
documented configuration surface (they appear verbatim under ``models:`` in deploy/*.yaml).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["embed", "classify", "generate"]
VariantName = Literal["torch", "onnx", "onnx-int8"]
VARIANT_NAMES: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
ONNX_VARIANTS: tuple[str, ...] = ("onnx", "onnx-int8")  # built by models.variants.build

# Names users put in the `model` string. Hub-style ids (`org/name`) are allowed for bases.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingSpec(_Strict):
    """Dynamic batching inside one ModelServer replica."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="Most rows in one forward pass.")
    max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="Extra time to wait for more rows once a batch could start. 0 means a batch "
        "starts as soon as the backend is free; rows that arrive while it runs form the next one.",
    )
    max_queue_rows: int = Field(
        1024, ge=1, description="Rows waiting in the replica's queue before new requests get 503."
    )
    stuck_batch_s: float = Field(
        120.0, gt=0, description="A forward pass running longer than this marks the replica "
        "unhealthy, so Serve's health check replaces it (a wedged backend).",
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Upper bound on rows x padded length in one forward pass."
    )
    split_by_adapter: bool = Field(
        False,
        description="Give each forward pass the rows of one adapter only, as Ray's "
        "`@serve.batch` with multiplexing does. Off: rows of every adapter and the bare base "
        "share batches (faster; on only to measure the difference).",
    )


class AdapterPolicy(_Strict):
    """Limits on LoRA adapters for this base (enforced when adapters are loaded)."""

    max_rank: int = Field(64, ge=1, description="Largest LoRA rank accepted for this base.")
    adapters_per_replica: int = Field(
        16, ge=1, description="Capacity of each replica's adapter LRU."
    )


class ParitySpec(_Strict):
    """What an ONNX variant must match before it serves (against torch, on the probe set:
    ``models/data/probe.txt`` and the short snippets; see ``models.variants.probe``)."""

    fp32_max_abs_diff: float = Field(
        1e-4, gt=0, description="`onnx`: largest allowed absolute difference of any embedding "
        "component or class probability.",
    )
    int8_cosine: float = Field(
        0.99, gt=0, le=1, description="`onnx-int8`: least mean cosine similarity of outputs "
        "(embeddings, or class probabilities) to torch's over the probe set.",
    )
    int8_min_cosine: float = Field(
        0.99, gt=0, le=1, description="`onnx-int8`: least cosine similarity of any one probe "
        "input's output to torch's (the probe set includes inputs of one to three words).",
    )
    int8_label_agreement: float = Field(
        0.99, gt=0, le=1, description="`onnx-int8` on a classifier: least share of probe "
        "sentences whose top label equals torch's.",
    )


class OnnxSpec(_Strict):
    """How ONNX variants of this model are built and run (ONNX Runtime, CPU)."""

    threads: int = Field(1, ge=1, le=256, description="Intra-op threads of each session.")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime's graph optimization level when a session is created.",
    )
    spinning: bool = Field(
        False, description="Let idle ORT threads spin: slightly lower latency, but each "
        "thread keeps a core busy while the replica is idle.",
    )
    quantization: Literal["auto", "avx512_vnni", "avx512", "avx2", "arm64"] = Field(
        "auto", description="Dynamic int8 config (optimum's AutoQuantizationConfig); `auto` "
        "picks it from this CPU's instruction set.",
    )
    per_channel: bool = Field(
        True, description="Per-channel weight scales. On all-MiniLM-L6-v2 (an AVX2 build, "
        "smoothquant off) int8 reaches a mean cosine of 0.98413 with them and 0.92659 per-tensor "
        "(loadtest/results/variants-build.md).",
    )
    smoothquant: bool = Field(
        True, description="Before int8: SmoothQuant on the exported graph (activation ranges "
        "from 256 real calibration sentences), the first feed-forward output projections kept "
        "fp32, the embedding tables fp32 and padding zeroed after the embeddings "
        "(models.variants.smoothing). Off: the "
        "plain graph is quantized, embedding tables included (the build before this recipe).",
    )
    smoothquant_alpha: float = Field(
        0.7, ge=0, le=1, description="SmoothQuant's migration strength: how much of each "
        "activation channel's range moves into the weights.",
    )
    int8_fp32_ffn_share: float = Field(
        0.67, ge=0, le=1, description="Share of the feed-forward output projections (the "
        "first layers first, rounded to the nearest count: 4 of minilm's 6) kept in fp32 in "
        "`onnx-int8`, when `smoothquant` is on.",
    )
    static_shapes: bool = Field(
        True, description="Give the exported graph's reshapes constant targets and fold the "
        "shape reads it can (models.variants.shapes): fewer nodes per call, same function. "
        "Off: the exporter's graph as it is.",
    )
    reload_poll_s: float = Field(
        2.0, ge=0, description="How often a replica checks its variant files for replacement "
        "(a replaced file serves only after it passes parity). 0: never.",
    )
    parity: ParitySpec = Field(default_factory=ParitySpec)


class GenerationSpec(_Strict):
    """Continuous batching of a generative base (``models.decoding.engine``) and the bounds
    on what a request may ask for."""

    max_running: int = Field(
        32, ge=1, le=1024, description="Sequences decoding at once in one replica (KV cache "
        "slots, each reserved for the full context).",
    )
    max_waiting: int = Field(
        256, ge=0, description="Sequences waiting for a slot before new requests get 503.",
    )
    step_tokens: int = Field(
        128, ge=1, le=65536, description="Prompt tokens one prefill pass may process (prompts "
        "are prefilled in chunks of at most this), so a long prompt delays the running streams "
        "by at most one chunk per step.",
    )
    prefix_cache_mb: float = Field(
        64, ge=0, description="Memory for the prefix cache: the KV of prompt prefixes already "
        "computed (whole blocks of 8 tokens, per adapter), copied into a new sequence's slot "
        "instead of recomputed; least recently used blocks go first. 0 turns it off.",
    )
    max_tokens: int = Field(
        512, ge=1, description="Largest `max_tokens` a request may ask for (the context bounds "
        "prompt plus output too).",
    )
    default_max_tokens: int = Field(
        256, ge=1, description="`max_tokens` when a request gives none (cut to the context).",
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per prompt).")
    max_stop: int = Field(8, ge=0, le=256, description="Most stop strings per request.")
    max_stop_chars: int = Field(64, ge=1, description="Longest stop string.")


class ModelSpec(_Strict):
    """One base model of the catalog."""

    id: str = Field(description="Short name used in the `model` string, e.g. `minilm`.")
    source: str = Field(
        description="Where the weights are: a local directory, or `package:<module>` for a "
        "Python package exposing `get_model_path()` (the bundled default uses this)."
    )
    hub_id: str | None = Field(
        None,
        description="Hugging Face hub id this model is known by; accepted as an alias in the "
        "`model` string and used to check adapter compatibility. Never downloaded.",
    )
    task: Task = Field(description="`embed`, `classify` or `generate` (a causal LM).")
    max_input_tokens: int | None = Field(
        None,
        ge=2,
        description="Longest accepted input including special tokens. Default: the model's own "
        "limit (sentence-transformers' max_seq_length, else the tokenizer's, else position "
        "embeddings).",
    )
    normalize: bool = Field(True, description="L2-normalize embeddings (embed task).")
    pooling: Literal["mean", "cls"] = Field("mean", description="Pooling for the embed task.")
    default_variant: VariantName = Field("torch", description="Variant used when none is named.")
    variants: tuple[VariantName, ...] = Field(("torch",), description="Variants to serve.")
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="Intra-op threads for torch; default: the CPUs Ray gives."
    )
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    onnx: OnnxSpec = Field(default_factory=OnnxSpec)
    adapters: AdapterPolicy = Field(default_factory=AdapterPolicy)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not NAME_RE.match(v) or "/" in v:
            raise ValueError(f"model id {v!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (no '/')")
        return v

    @model_validator(mode="after")
    def _default_variant_served(self) -> ModelSpec:
        if self.default_variant not in self.variants:
            raise ValueError(
                f"default_variant {self.default_variant!r} is not in variants {self.variants}"
            )
        return self

    @model_validator(mode="after")
    def _generate_on_torch(self) -> ModelSpec:
        if self.task == "generate" and self.variants != ("torch",):
            raise ValueError("a generative model serves the `torch` variant only")
        return self

    def names(self) -> tuple[str, ...]:
        """Every name this model answers to in a `model` string."""
        return (self.id,) + ((self.hub_id,) if self.hub_id else ())
