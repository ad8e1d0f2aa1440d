"""Writing a trained adapter: safetensors weights, the card, its README, all or nothing.

The adapter is written to a hidden sibling folder and renamed into place, so a store that
watches ``out_dir.parent`` never sees half an adapter, and ``overwrite`` leaves no old file.
Files get the usual read permissions (safetensors writes 0600; a store served by another user
must read it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from models.adapters.config import CARD_FILE


def check_out_dir(out_dir: Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output directory {str(out_dir)!r} exists and is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(out_dir)!r} exists and is not empty (pass overwrite)")
    return out_dir


def save_adapter(model, card: dict, readme: str, out_dir: Path) -> None:
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # no embedding-resize check: it would look the hub id up online, and we never resize
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (staging / "README.md").write_text(readme)
        mode = 0o666 & ~_umask()
        for f in staging.iterdir():
            f.chmod(mode)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)  # empty, or overwrite was asked for
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
