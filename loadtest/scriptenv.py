"""Imported first by the benchmark scripts: Hugging Face offline, and both the loadtest helpers
(``report``, ``httpload``, ...) and the repository (``serve``, ``models``) importable wherever
a script is started from. ``python loadtest/<script>.py`` puts this folder on ``sys.path``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
