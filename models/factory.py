"""The one factory: which ``Backend`` implementation serves a (base, variant).

Nothing is loaded or built here. An ONNX variant must already be in the variant cache
(``models.variants.ensure_variants`` builds it; ``loraserve up`` and ``loraserve export`` call
that before any replica starts); a missing one raises ``ModelLoadError`` naming the fix.
"""

from __future__ import annotations

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
