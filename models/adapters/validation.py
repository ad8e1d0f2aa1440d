"""Adapter validation: everything that runs before any weight reaches a model, so a hostile or
broken adapter is refused with a clear 4xx-class error and harms nobody:

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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from models.adapters.config import (
    CONFIG_FILE,
    TASK_TYPES,
    WEIGHTS_FILE,
    adapter_task,
    read_config,
    read_labels,
)
from models.adapters.weights import check_head, check_weights
from models.errors import InvalidAdapter

FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc")


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
