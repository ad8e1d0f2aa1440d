"""The Ray-free engine: model specs, the ``Backend`` seam, its torch and ONNX implementations,
ONNX variants, LoRA adapters and fine-tuning. Nothing in this package imports ``serve`` or
``ray`` (enforced by import-linter, see pyproject.toml).

This module is the package's public API. Names that pull in torch, transformers or ONNX Runtime
are resolved lazily on first use, so ``import models`` stays cheap.
"""

from __future__ import annotations

import importlib

from models.errors import (
    AdapterNotFound,
    Conflict,
    InferenceTimeout,
    InputTooLong,
    InvalidAdapter,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    TaskNotSupported,
    TooManyInputs,
    VariantNotFound,
    VariantUnavailable,
)
from models.spec import AdapterPolicy, BatchingSpec, GenerationSpec, ModelSpec, Task, VariantName
from models.target import Target

# name -> module that defines it (imported on first access)
_LAZY = {
    "Backend": "models.backend",
    "create_backend": "models.factory",
    "ensure_variants": "models.variants.build",
    "references": "models.variants.cache",
    "probe_texts": "models.variants.probe",
    "run_probe": "models.variants.probe",
    "AdapterRef": "models.adapters.identity",
    "AdapterCheck": "models.adapters.validation",
    "WEIGHTS_FILE": "models.adapters.config",
    "base_weight_shapes": "models.adapters.weights",
    "validate_adapter": "models.adapters.validation",
    "read_labels": "models.adapters.config",
    "resolve_source": "models.sources",
    "LoraEncoder": "models.lora_slots",
    "classifier_head": "models.adapters.weights",
    "served_module_name": "models.adapters.weights",
    "build_tiny_bert": "models.tiny",
    "GenSeq": "models.decoding.engine",
    "SamplingParams": "models.decoding.sampling",
}

__all__ = [
    "AdapterNotFound",
    "AdapterPolicy",
    "BatchingSpec",
    "Conflict",
    "GenerationSpec",
    "InferenceTimeout",
    "InputTooLong",
    "InvalidAdapter",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "ModelSpec",
    "NotFound",
    "NotReady",
    "Overloaded",
    "ServiceError",
    "Target",
    "Task",
    "TaskNotSupported",
    "TooManyInputs",
    "VariantName",
    "VariantNotFound",
    "VariantUnavailable",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
