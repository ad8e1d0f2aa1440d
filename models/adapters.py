"""LoRA adapters: identity, safe location inside an adapter store, and compatibility checks.

An adapter's identity (``AdapterRef``), its config (peft's ``adapter_config.json``) and its
weights (``adapter_model.safetensors``) are three separate things (as in LoRAX). Everything here
runs before any weight reaches a model, so a hostile or broken adapter is refused with a clear
4xx-class error and harms nobody:

- location: the path must resolve (symlinks followed) inside one of the configured store roots;
  absolute paths elsewhere, ``..`` and links leaving the root are refused;
- files: ``adapter_config.json`` and ``adapter_model.safetensors`` must exist; pickle weights
  (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``) and Python files are refused, as is any
  ``auto_map`` (remote code);
- config: peft type LoRA, rank within the base's limit, a task the base serves;
- weights: a readable safetensors header whose LoRA matrices target modules that exist in the
  base with matching shapes (``A: [r, in]``, ``B: [out, r]`` against the base's ``[out, in]``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from models.errors import Conflict, InvalidRequest, ModelLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "loraserve_card.json"  # written by models.finetune; holds the label names
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc")
MAX_HEADER_BYTES = 100_000_000
# peft task types per serving task
TASK_TYPES = {"classify": {"SEQ_CLS"}, "embed": {"FEATURE_EXTRACTION", None}}
# What an adapter on an encoder base serves, by its peft task type.
ENCODER_ADAPTER_TASKS = {"SEQ_CLS": "classify", "FEATURE_EXTRACTION": "embed", None: "embed"}
NAME_MAX = 64


class InvalidAdapter(InvalidRequest):
    code = "invalid_adapter"


@dataclass(frozen=True)
class AdapterRef:
    """Immutable identity of one registered adapter: what the registry stores and persists,
    what a request resolves to, and what a replica needs to load it (it re-validates the
    files and refuses them if their content no longer matches ``sha256``)."""

    name: str
    base: str  # catalog id of the base model
    path: str  # absolute, resolved, inside a store root
    rank: int
    sha256: str  # of adapter_model.safetensors
    task: str  # what it serves: `embed` or `classify`
    labels: tuple[str, ...] = ()
    size_bytes: int = 0
    pinned: bool = False  # never evicted from a replica's LRU; loaded at replica start
    origin: str = "runtime"  # `config` (declared in deploy/*.yaml) or `runtime` (admin API)
    created: int = 0

    @property
    def key(self) -> str:
        """Name of the loaded copy inside a backend: a replaced adapter (same name, new
        content) loads beside the old copy, which in-flight batches may still be using."""
        return f"{self.name}#{self.sha256[:12]}"

    def to_dict(self) -> dict:
        return {**self.__dict__, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterRef":
        return cls(**{**d, "labels": tuple(d.get("labels") or ())})


def check_adapter_name(name: str, taken_by_bases: set[str]) -> str:
    """Adapter names appear in the ``model`` string: no ``:``, ``@`` or ``/``, and no clash
    with a base model's names."""
    if not isinstance(name, str) or not name or len(name) > NAME_MAX:
        raise InvalidAdapter(f"adapter name must be 1..{NAME_MAX} characters", param="lora_name")
    if not (name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name) and name.isascii()):
        raise InvalidAdapter(
            f"adapter name {name!r} must match [A-Za-z0-9][A-Za-z0-9._-]*", param="lora_name"
        )
    if name in taken_by_bases:
        raise Conflict(f"{name!r} is the name of a base model", param="lora_name")
    return name


@dataclass(frozen=True)
class AdapterCheck:
    """What validation learned: enough to register the adapter and to load it later."""

    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    task_type: str | None
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    sha256: str
    size_bytes: int
    task: str = "embed"  # what the adapter serves (from its peft task type)
    labels: tuple[str, ...] = ()  # classify adapters: label names in id order
    base_model: str | None = None  # adapter_config's base_model_name_or_path (informational)


def resolve_in_store(raw: str, roots: list[Path]) -> Path:
    """The adapter directory for a user-given path, which must stay inside a store root.

    ``raw`` is absolute or relative to a root; URL-encoding is decoded first so ``%2e%2e``
    cannot smuggle a ``..``; the result is fully resolved (symlinks followed) before the
    containment check, so a link that leaves its root is refused.
    """
    if not raw or "\x00" in raw:
        raise InvalidAdapter("adapter path is empty or contains a NUL byte", param="lora_path")
    decoded = unquote(raw)
    if ".." in Path(decoded).parts:
        raise InvalidAdapter(f"adapter path {raw!r} must not contain '..'", param="lora_path")
    resolved_roots = [r.resolve() for r in roots]
    candidates = [Path(decoded)] if Path(decoded).is_absolute() else [r / decoded for r in resolved_roots]
    for cand in candidates:
        real = cand.resolve()
        if any(real == r or r in real.parents for r in resolved_roots) and real.is_dir():
            return real
    if any(c.exists() for c in candidates):
        raise InvalidAdapter(
            f"adapter path {raw!r} lies outside every adapter store root", param="lora_path"
        )
    raise InvalidAdapter(f"adapter path {raw!r} does not exist in any adapter store", param="lora_path")


def check_files(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.suffix.lower() in FORBIDDEN_SUFFIXES:
            raise InvalidAdapter(
                f"adapter contains {p.name!r}: pickle weights and Python files are refused "
                "(save with safetensors)",
                param="lora_path",
            )
        if p.is_symlink():
            raise InvalidAdapter(f"adapter contains a symbolic link {p.name!r}", param="lora_path")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise InvalidAdapter(f"adapter has no {name}", param="lora_path")


def read_config(directory: Path) -> dict:
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}", param="lora_path") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object", param="lora_path")
    if "auto_map" in cfg or cfg.get("auto_mapping"):
        raise InvalidAdapter("adapters with auto_map (remote code) are refused", param="lora_path")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"peft_type {cfg.get('peft_type')!r} is not LORA", param="lora_path")
    return cfg


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header alone (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= n <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
        size = path.stat().st_size
        shapes = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            if not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"tensor {name} lies past the end of the file")
            shapes[name] = [int(d) for d in meta["shape"]]
        return shapes
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
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


def validate_adapter(
    raw_path: str,
    roots: list[Path],
    *,
    base_shapes: dict[str, list[int]],
    task: str | None = None,
    max_rank: int,
    base_task: str = "embed",
) -> AdapterCheck:
    """All checks of the module docstring, cheapest first. Raises ``InvalidAdapter``.

    ``task`` is the task the adapter must serve; ``None`` infers it from the peft task type
    for a base serving ``base_task`` (``adapter_task``)."""
    directory = resolve_in_store(raw_path, roots)
    check_files(directory)
    cfg = read_config(directory)
    rank = cfg.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter(f"adapter rank r={rank!r} is not a positive integer", param="lora_path")
    if rank > max_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds this base's limit of {max_rank}", param="lora_path")
    task_type = cfg.get("task_type")
    if task is None:
        task = adapter_task(task_type, base_task)
    elif task_type not in TASK_TYPES.get(task, set()):
        raise InvalidAdapter(
            f"adapter task_type {task_type!r} does not fit a base serving {task!r}", param="lora_path"
        )
    modules = check_weights(directory, base_shapes, rank)
    weights = directory / WEIGHTS_FILE
    labels = check_head(directory, read_labels(directory)) if task == "classify" else ()
    return AdapterCheck(
        path=directory,
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        task_type=task_type,
        target_modules=modules,
        modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        size_bytes=weights.stat().st_size,
        task=task,
        labels=labels,
        base_model=cfg.get("base_model_name_or_path"),
    )


def adapter_task(task_type: str | None, base_task: str) -> str:
    """The task an adapter serves on a base, from its peft ``task_type``: on an encoder base
    (embed or classify) ``SEQ_CLS`` classifies and ``FEATURE_EXTRACTION`` (or none) embeds."""
    if base_task in ("embed", "classify") and task_type in ENCODER_ADAPTER_TASKS:
        return ENCODER_ADAPTER_TASKS[task_type]
    raise InvalidAdapter(
        f"adapter task_type {task_type!r} does not fit a base serving {base_task!r}",
        param="lora_path",
    )


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


def read_labels(directory: Path) -> tuple[str, ...]:
    """Label names from the adapter's model card (``models.finetune`` writes it); without a
    card the server names them ``LABEL_<i>``. The count is checked against the head later."""
    card = directory / CARD_FILE
    if not card.is_file():
        return ()
    try:
        labels = json.loads(card.read_text()).get("labels")
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidAdapter(f"{CARD_FILE} is not valid JSON: {exc}", param="lora_path") from None
    if labels is None:
        return ()
    if (
        not isinstance(labels, list)
        or not 2 <= len(labels) <= 1024
        or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise InvalidAdapter(
            f"{CARD_FILE} labels must be 2..1024 distinct non-empty strings", param="lora_path"
        )
    return tuple(labels)


def base_weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Shapes of a base checkpoint's tensors, read from its safetensors header(s)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        shapes.update(read_safetensors_header(f))
    if not shapes:
        raise ModelLoadError(f"base model at {model_dir} has no safetensors weights")
    return shapes
