"""Turning an admin load request (or a config entry) into a validated ``AdapterRef``.

Runs in the ingress replica before anything is registered, off the event loop (file reads and
a sha256 of the weights). Every refusal is a typed error with a clear message (see
``models.adapters.validation`` for the checks); nothing is registered unless all of them pass, so a bad
adapter harms nobody. The base is the one named in the request or, failing that, the one the
adapter's own config names (its hub id, or a local path of one of the catalog's checkpoints).
"""

from __future__ import annotations

import time
from pathlib import Path

from models.adapters.config import WEIGHTS_FILE, read_config
from models.adapters.identity import AdapterRef, check_adapter_name
from models.adapters.validation import resolve_in_store, validate_adapter
from models.adapters.weights import base_weight_shapes
from models.catalog import Catalog
from models.errors import InvalidAdapter, ModelNotFound
from models.sources import resolve_source
from models.spec import ModelSpec


class AdapterInspector:
    """Validates adapters against the catalog's bases; caches each base's weight shapes."""

    def __init__(self, catalog: Catalog, roots: list[Path]):
        self.catalog = catalog
        self.roots = roots
        self._shapes: dict[str, dict] = {}
        self._paths: dict[str, Path] = {}

    def _base_path(self, spec: ModelSpec) -> Path:
        if spec.id not in self._paths:
            self._paths[spec.id] = resolve_source(spec.source).resolve()
        return self._paths[spec.id]

    def base_for(self, lora_path: str, base_name: str | None) -> ModelSpec:
        if base_name is not None:
            spec = self.catalog.base(base_name)
            if spec is None:
                raise ModelNotFound(f"no base model named {base_name!r}", param="base_model_name")
            return spec
        cfg = read_config(resolve_in_store(lora_path, self.roots))
        named = cfg.get("base_model_name_or_path")
        if isinstance(named, str) and named:
            spec = self.catalog.base(named)
            if spec is not None:
                return spec
            for candidate in self.catalog.specs:  # a local path of one of our checkpoints
                try:
                    if Path(named).resolve() == self._base_path(candidate):
                        return candidate
                except (OSError, ValueError):
                    break
        raise InvalidAdapter(
            f"cannot tell which base this adapter is for (its config names {named!r}); "
            "send base_model_name",
            param="base_model_name",
        )

    def inspect(
        self, name: str, lora_path: str, base_name: str | None = None, *, pinned: bool = False,
        origin: str = "runtime",
    ) -> AdapterRef:
        check_adapter_name(name, self.catalog.base_names)
        spec = self.base_for(lora_path, base_name)
        if spec.id not in self._shapes:
            self._shapes[spec.id] = base_weight_shapes(self._base_path(spec))
        check = validate_adapter(
            lora_path, self.roots, base_shapes=self._shapes[spec.id], task=None,
            base_task=spec.task, max_rank=spec.adapters.max_rank,
        )
        weights = check.path / WEIGHTS_FILE
        return AdapterRef(
            name=name,
            base=spec.id,
            path=str(check.path),
            rank=check.rank,
            sha256=check.sha256,
            task=check.task,
            labels=check.labels,
            size_bytes=check.size_bytes,
            pinned=pinned,
            origin=origin,
            # config adapters: stable across replicas and restarts (the file's time)
            created=int(weights.stat().st_mtime) if origin == "config" else int(time.time()),
        )
