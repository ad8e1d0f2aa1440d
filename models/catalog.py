"""The catalog: which names exist, and what a parsed ``Target`` resolves to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from models.errors import AdapterNotFound, ModelNotFound, VariantNotFound
from models.spec import ModelSpec
from models.target import Target


@dataclass(frozen=True)
class Resolved:
    spec: ModelSpec
    variant: str
    adapter: str | None = None


class Catalog:
    """Bases by every name they answer to (id and hub id)."""

    def __init__(self, specs: Iterable[ModelSpec]):
        self.specs: tuple[ModelSpec, ...] = tuple(specs)
        self._by_name = {name: s for s in self.specs for name in s.names()}

    def resolve(self, target: Target) -> Resolved:
        spec = self._by_name.get(target.head)
        if spec is None:
            raise ModelNotFound(
                f"no model or adapter named {target.head!r}; see GET /v1/models", param="model"
            )
        if target.adapter is not None:
            raise AdapterNotFound(
                f"adapter {target.adapter!r} is not registered on {spec.id!r}", param="model"
            )
        variant = target.variant or spec.default_variant
        if variant not in spec.variants:
            raise VariantNotFound(
                f"model {spec.id!r} has no variant {variant!r}; it serves "
                f"{', '.join(spec.variants)}",
                param="model",
            )
        return Resolved(spec, variant)
