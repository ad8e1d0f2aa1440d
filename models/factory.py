"""The one factory: which ``Backend`` implementation serves a (base, variant).

``create_backend`` loads and builds nothing. An ONNX variant must already be in the variant
cache (``models.variants.build.ensure_variants`` builds it; ``loraserve up`` and ``loraserve
export`` call that before any replica starts); a missing one raises ``ModelLoadError`` naming
the fix. ``backend_factory`` is what a server uses: the build made explicit, then the factory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.backend import Backend
from models.errors import ModelLoadError, VariantNotFound
from models.sources import resolve_source
from models.spec import ONNX_VARIANTS, ModelSpec


def create_backend(spec: ModelSpec, variant: str, variant_cache: Path | None = None) -> Backend:
    """An unloaded backend for ``spec`` at ``variant`` (call ``load()`` next)."""
    if variant not in spec.variants:
        raise VariantNotFound(
            f"model {spec.id!r} has no variant {variant!r}; it serves {', '.join(spec.variants)}",
            param="model",
        )
    path = resolve_source(spec.source)
    if spec.task == "generate":
        from models.decoding.backend import GenerativeBackend

        return GenerativeBackend(spec, path)
    if variant == "torch":
        from models.torch_backend import TorchBackend

        return TorchBackend(spec, path)
    if variant in ONNX_VARIANTS:
        from models.onnx_backend import OnnxBackend
        from models.variants.cache import existing_root

        if variant_cache is None:
            raise ModelLoadError(f"no variant cache folder given for {spec.id}@{variant}")
        return OnnxBackend(spec, path, variant, existing_root(spec, path, variant_cache) / variant)
    raise VariantNotFound(f"variant {variant!r} is not available in this build", param="model")


def backend_factory(cache: Path) -> Callable[[ModelSpec, str], Backend]:
    """``create_backend`` over the variant cache, building an ONNX variant first when it is
    missing (a cluster node with a disk of its own; under the build's file lock)."""

    def make(spec: ModelSpec, variant: str) -> Backend:
        if variant in ONNX_VARIANTS:
            from models.variants.build import ensure_variants  # torch and optimum: only here

            ensure_variants(spec, cache)
        return create_backend(spec, variant, cache)

    return make
