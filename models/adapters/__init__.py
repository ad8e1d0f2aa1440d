"""LoRA adapters: identity (``AdapterRef``), config (peft's ``adapter_config.json`` and the
card's labels), weights (read without torch) and validation (``validate_adapter``). As in LoRAX,
identity, config and weights are three separate things."""

from models.adapters.config import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, read_labels
from models.adapters.identity import AdapterRef, check_adapter_name
from models.adapters.validation import AdapterCheck, validate_adapter
from models.adapters.weights import base_weight_shapes, read_tensors

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterCheck",
    "AdapterRef",
    "base_weight_shapes",
    "check_adapter_name",
    "read_labels",
    "read_tensors",
    "validate_adapter",
]
