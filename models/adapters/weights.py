"""An adapter's weights, read without torch: safetensors headers (shapes only, for validation),
the tensors themselves as numpy arrays, the base checkpoint's weight shapes, and the checks that
every LoRA pair fits its base module and a classification head fits its labels.

The reader is ours (a safetensors file is an 8-byte header length, a JSON header and raw
little-endian tensor bytes), so bf16 adapters load too (widened to float32), which numpy's
safetensors loader cannot do.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.adapters.config import CARD_FILE, WEIGHTS_FILE
from models.errors import InvalidAdapter, ModelLoadError

MAX_HEADER_BYTES = 100_000_000
# safetensors dtypes we read (BF16 is widened by hand); others (FP8, ...) are refused at validation
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_header(fh, path: Path) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", fh.read(8))
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise ValueError(f"header length {n}")
    header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    size = path.stat().st_size
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if not 0 <= start <= end <= size - 8 - n:
            raise ValueError(f"tensor {name} lies past the end of the file")
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {meta['dtype']}, which is not served")
    return header, 8 + n


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header alone (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            header, _ = _read_header(fh, path)
        return {k: [int(d) for d in m["shape"]] for k, m in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise InvalidAdapter(f"{path.name} is not a valid safetensors file: {exc}", param="lora_path") from None


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a numpy array (float tensors as float32)."""
    try:
        with open(path, "rb") as fh:
            header, _ = _read_header(fh, path)
            data = fh.read()
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES[meta["dtype"]]
            start, end = meta["data_offsets"]
            raw = np.frombuffer(data, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                offset=start)
            if meta["dtype"] == "BF16":  # the upper half of a float32
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            elif raw.dtype.kind == "f":
                raw = raw.astype(np.float32)  # a copy (F32 too): the file's bytes are not kept
            else:
                raw = raw.copy()
            out[name] = raw.reshape([int(d) for d in meta["shape"]])
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise InvalidAdapter(f"{path.name} is not a valid safetensors file: {exc}", param="lora_path") from None


def _base_weight(module: str, base_shapes: dict[str, list[int]]) -> list[int] | None:
    """Shape of ``<module>.weight`` in the base, tolerating a task wrapper's prefix
    (``bert.encoder...`` in a classifier against ``encoder...`` in a plain checkpoint)."""
    parts = module.split(".")
    for i in range(len(parts)):
        key = ".".join(parts[i:]) + ".weight"
        if key in base_shapes:
            return base_shapes[key]
    for key, shape in base_shapes.items():  # base keys may carry the prefix instead
        if key.endswith("." + module + ".weight"):
            return shape
    return None


def check_weights(
    directory: Path, base_shapes: dict[str, list[int]], rank: int
) -> tuple[str, ...]:
    """Every LoRA pair targets an existing base module with matching shapes; returns modules."""
    shapes = read_safetensors_header(directory / WEIGHTS_FILE)
    modules: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        for kind in ("lora_A", "lora_B"):
            marker = f".{kind}."
            if marker in name:
                module = name.split(marker)[0].removeprefix("base_model.model.")
                modules.setdefault(module, {})[kind] = shape
    if not modules:
        raise InvalidAdapter("adapter weights hold no LoRA matrices", param="lora_path")
    for module, pair in sorted(modules.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidAdapter(f"module {module!r} lacks a lora_A/lora_B pair", param="lora_path")
        base = _base_weight(module, base_shapes)
        if base is None:
            raise InvalidAdapter(f"target module {module!r} does not exist in the base model", param="lora_path")
        a, b = pair["lora_A"], pair["lora_B"]
        if len(base) != 2 or a != [rank, base[1]] or b != [base[0], rank]:
            raise InvalidAdapter(
                f"module {module!r}: LoRA shapes A{a} B{b} do not fit the base weight {base} "
                f"at rank {rank}",
                param="lora_path",
            )
    return tuple(sorted(modules))


def check_head(directory: Path, labels: tuple[str, ...]) -> tuple[str, ...]:
    """A classification adapter carries its head (peft ``modules_to_save``); its width must
    match the card's labels. Returns the labels (``LABEL_<i>`` when the card has none)."""
    shapes = read_safetensors_header(directory / WEIGHTS_FILE)
    weight = next((v for k, v in shapes.items() if k.endswith("classifier.weight")
                   or k.endswith("classifier.modules_to_save.default.weight")), None)
    if weight is None or len(weight) != 2 or not 2 <= weight[0] <= 1024:
        raise InvalidAdapter(
            "classification adapter has no classifier head (2..1024 outputs) in its weights",
            param="lora_path",
        )
    if labels and len(labels) != weight[0]:
        raise InvalidAdapter(
            f"{CARD_FILE} names {len(labels)} labels but the head has {weight[0]} outputs",
            param="lora_path",
        )
    return labels or tuple(f"LABEL_{i}" for i in range(weight[0]))


def base_weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Shapes of a base checkpoint's tensors, read from its safetensors header(s)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        shapes.update(read_safetensors_header(f))
    if not shapes:
        raise ModelLoadError(f"base model at {model_dir} has no safetensors weights")
    return shapes


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's tensors, keyed by the served model's module names: ``pairs[module]`` is
    ``(A [r, in], B [out, r])``; ``head`` holds any other saved tensors (a classifier head)."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    head: dict[str, np.ndarray]


def read_lora(path: Path, module_names: set[str]) -> LoraWeights:
    """Read ``adapter_model.safetensors`` (peft's key layout) onto ``module_names``."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    head = {}
    for key, tensor in read_tensors(Path(path)).items():
        key = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            marker = ".lora_A." if ".lora_A." in key else ".lora_B."
            module = served_module_name(key.split(marker)[0], module_names)
            pairs.setdefault(module, {})[marker[1:-1]] = tensor
        else:
            head[key.replace(".modules_to_save.default", "")] = tensor
    out = {}
    for module, pair in pairs.items():
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidAdapter(f"module {module!r} has malformed LoRA matrices", param="lora_path")
        out[module] = (a, b)
    return LoraWeights(out, head)


def served_module_name(module: str, module_names: set[str]) -> str:
    """The served model's name for an adapter's module (a task wrapper's prefix such as
    ``bert.`` may sit on either side)."""
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[i:])
        if name in module_names:
            return name
    raise InvalidAdapter(f"target module {module!r} does not exist in the served model", param="lora_path")


def classifier_head(head_tensors: dict, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(weight [labels, hidden], bias [labels], labels)`` of a classification adapter."""
    weight = next((v for k, v in head_tensors.items() if k.endswith("classifier.weight")), None)
    bias = next((v for k, v in head_tensors.items() if k.endswith("classifier.bias")), None)
    if weight is None or bias is None or weight.ndim != 2:
        raise InvalidAdapter("classification adapter has no classifier head weights", param="lora_path")
    if not labels:
        labels = tuple(f"LABEL_{i}" for i in range(weight.shape[0]))
    if len(labels) != weight.shape[0]:
        raise InvalidAdapter(
            f"adapter names {len(labels)} labels but its head has {weight.shape[0]} outputs",
            param="lora_path",
        )
    return weight, bias, labels
