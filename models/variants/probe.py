"""The probe set and the probe adapter the parity gate runs.

The probe set: the 64 sentences of ``models/data/probe.txt`` (3 to 117 tokens: reviews,
headlines, code, other languages, emoji, long paragraphs), then every distinct input of one to
three words in the human-rated VADER snippets (``models/data/snippets``, real text: "Maybe.",
"Great stuff.", "Forget it."), where int8 loses the most: every token counts. The probe adapter is a seeded
random LoRA (peft's own format) on every linear layer of the encoder: run on every other probe
row, it holds the LoRA graph's gathers, scaling and per-row indices to torch, not only the base
weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.adapters.validation import AdapterCheck, validate_adapter
from models.adapters.weights import base_weight_shapes
from models.spec import ModelSpec

PROBE_FILE = Path(__file__).resolve().parent.parent / "data" / "probe.txt"
SNIPPETS = PROBE_FILE.parent / "snippets"  # VADER's real sentences (MIT, license beside them)
SHORT_WORDS = 3
CALIBRATION_TEXTS = 256  # longer snippets int8 calibration reads (models.variants.smoothing)
PROBE_BATCH = 16
PROBE_KEY = "__parity_probe__"  # the probe adapter's key inside a backend while it is checked
# std of the probe adapter's LoRA matrices at hidden size 384, scaled by sqrt(384 / hidden):
# on all-MiniLM-L6-v2 the adapted rows' cosine to the bare ones is 0.85 on average, so an
# adapter path that did nothing could not pass even the int8 gate
PROBE_STD = 0.05


def probe_texts() -> list[str]:
    return [line for line in PROBE_FILE.read_text(encoding="utf-8").splitlines() if line.strip()] + short_texts()


def snippet_texts() -> list[str]:
    """Every snippet's text, in file order (``id<TAB>rating<TAB>text`` per line)."""
    return [line.split("\t")[-1].strip() for path in sorted(SNIPPETS.glob("*_GroundTruth.txt"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def short_texts() -> list[str]:
    """The distinct snippets of one to ``SHORT_WORDS`` words, in file order."""
    seen: dict[str, None] = {}
    for text in snippet_texts():
        if 0 < len(text.split()) <= SHORT_WORDS:
            seen.setdefault(text)
    return list(seen)


def run_probe(backend, texts: list[str] | None = None, adapter: str | None = None,
              **predict_kw) -> np.ndarray:
    """``backend``'s outputs for the probe set, ``[texts, width]`` float32 (truncated to the
    model's input limit, batched as a replica would). With ``adapter``, even rows run it and
    odd rows the bare base, in the same batches (mixed-adapter batches)."""
    rows = backend.encode(texts or probe_texts(), truncate=True)
    outs = []
    for i in range(0, len(rows), PROBE_BATCH):
        batch = rows[i:i + PROBE_BATCH]
        names = None if adapter is None else [adapter if (i + j) % 2 == 0 else None for j in range(len(batch))]
        outs.append(np.stack(backend.predict(batch, names, **predict_kw)))
    return np.concatenate(outs).astype(np.float32)


def write_probe_adapter(spec: ModelSpec, source: Path, dest: Path) -> None:
    """Write the seeded random probe adapter for ``spec`` to ``dest``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    kw = dict(local_files_only=True, trust_remote_code=False, use_safetensors=True)
    if spec.task == "classify":
        model, task_type = AutoModelForSequenceClassification.from_pretrained(source, **kw), "SEQ_CLS"
    else:
        model, task_type = AutoModel.from_pretrained(source, **kw), "FEATURE_EXTRACTION"
    config = LoraConfig(task_type=task_type, r=4, lora_alpha=8,
                        target_modules=["query", "key", "value", "dense"])
    adapted = get_peft_model(model, config)
    std = PROBE_STD * (384 / model.config.hidden_size) ** 0.5
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    adapted.save_pretrained(dest, safe_serialization=True)


def probe_adapter_check(spec: ModelSpec, source: Path, folder: Path) -> AdapterCheck:
    """The probe adapter, validated as any adapter is."""
    return validate_adapter(str(folder), [folder.parent], base_shapes=base_weight_shapes(source),
                            max_rank=64, base_task=spec.task)
