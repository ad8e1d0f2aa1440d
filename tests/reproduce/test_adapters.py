"""`make adapters` rebuilds the shipped demo adapters byte for byte: each is retrained into a
temporary folder (with the pinned CPU kernels of models/training/demo.py) and the sha256 of each
adapter_model.safetensors must equal the shipped file's. Run by `make reproduce` (minutes of
training; `make test` runs the quick determinism check in tests/model/test_finetune.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.sources import sha256_file

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["sentiment", "topic", "ending"])
def test_make_adapters_rebuilds_the_shipped_weights(tmp_path, name):
    out = subprocess.run([sys.executable, "-m", "models.training.demo", "--out", str(tmp_path), "--only", name],
                         cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    shipped, rebuilt = REPO / "adapters" / name, tmp_path / name
    assert sha256_file(rebuilt / "adapter_model.safetensors") == sha256_file(shipped / "adapter_model.safetensors")
    assert (rebuilt / "adapter_config.json").read_text() == (shipped / "adapter_config.json").read_text()
    card, again = (json.loads((d / "loraserve_card.json").read_text()) for d in (shipped, rebuilt))
    for volatile in ("created", "train_seconds", "command"):
        card.pop(volatile), again.pop(volatile)
    assert again == card  # labels, data hashes, every epoch's and held-out metric
