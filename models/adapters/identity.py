"""Adapter identity: the frozen ``AdapterRef`` the registry stores and requests resolve to,
and the rule for adapter names (they appear in the ``model`` string)."""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import Conflict, InvalidAdapter

NAME_MAX = 64


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
    def from_dict(cls, d: dict) -> AdapterRef:
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
