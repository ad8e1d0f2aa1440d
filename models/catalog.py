"""The catalog: which names exist, and what a parsed ``Target`` resolves to.

Bases come from the configuration; adapters from the registry (a mapping of adapter name to
``AdapterRef`` that the caller passes in, so this module stays free of Ray).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from models.adapters.identity import AdapterRef
from models.errors import AdapterNotFound, ModelNotFound, VariantNotFound
from models.spec import ModelSpec
from models.target import Target


@dataclass(frozen=True)
class Resolved:
    spec: ModelSpec
    variant: str
    adapter: AdapterRef | None = None


class Catalog:
    """Bases by every name they answer to (id and hub id)."""

    def __init__(self, specs: Iterable[ModelSpec]):
        self.specs: tuple[ModelSpec, ...] = tuple(specs)
        self._by_name = {name: s for s in self.specs for name in s.names()}

    def base(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    @property
    def base_names(self) -> set[str]:
        return set(self._by_name)

    def resolve(self, target: Target, adapters: Mapping[str, AdapterRef] | None = None) -> Resolved:
        adapters = adapters or {}
        spec = self._by_name.get(target.head)
        adapter = None
        if spec is None:  # a lone adapter name
            adapter = adapters.get(target.head) if target.adapter is None else None
            if adapter is None:
                raise ModelNotFound(
                    f"no model or adapter named {target.head!r}; see GET /v1/models", param="model"
                )
            spec = self._by_name[adapter.base]
        elif target.adapter is not None:
            adapter = adapters.get(target.adapter)
            if adapter is None or adapter.base != spec.id:
                where = f" (it is registered on {adapter.base!r})" if adapter is not None else ""
                raise AdapterNotFound(
                    f"adapter {target.adapter!r} is not registered on {spec.id!r}{where}",
                    param="model",
                )
        variant = target.variant or spec.default_variant
        if variant not in spec.variants:
            raise VariantNotFound(
                f"model {spec.id!r} has no variant {variant!r}; it serves "
                f"{', '.join(spec.variants)}",
                param="model",
            )
        return Resolved(spec, variant, adapter)
