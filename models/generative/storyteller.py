"""The default generative base shipped in this repository (``models/data/storyteller``; how it
was made: its README and ``models.generative.build``). A catalog entry names it as
``source: package:models.generative.storyteller``."""

from __future__ import annotations

from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "storyteller"
