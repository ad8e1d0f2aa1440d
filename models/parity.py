"""The parity gate: an ONNX variant serves only when its outputs match torch's on a probe set.

The probe set (``models/data/probe.txt``, shipped) holds 64 sentences of 3 to 117 tokens:
reviews, headlines, code, other languages, emoji, long paragraphs. The reference is what the
served torch backend returns for them (pooled embeddings, or class probabilities), computed once
per checkpoint and cached with the variants. Rules (thresholds in ``ModelSpec.onnx.parity``):

- ``onnx`` (fp32): the largest absolute difference of any output component <= ``fp32_max_abs_diff``;
- ``onnx-int8``: mean cosine similarity to the reference >= ``int8_cosine`` and, for a
  classifier, top-label agreement >= ``int8_label_agreement``.

The result is a plain dict: it travels to ``/v1/models`` as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.spec import ParitySpec

PROBE_FILE = Path(__file__).resolve().parent / "data" / "probe.txt"
PROBE_BATCH = 16


def probe_texts() -> list[str]:
    return [line for line in PROBE_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_probe(backend, texts: list[str] | None = None, **predict_kw) -> np.ndarray:
    """``backend``'s outputs for the probe set, ``[texts, width]`` float32 (truncated to the
    model's input limit, batched as a replica would)."""
    rows = backend.encode(texts or probe_texts(), truncate=True)
    outs = [np.asarray(backend.predict(rows[i:i + PROBE_BATCH], **predict_kw))
            for i in range(0, len(rows), PROBE_BATCH)]
    return np.concatenate(outs).astype(np.float32)


def check_variant(backend, reference: np.ndarray) -> dict:
    """Parity of an ONNX backend with both of its graphs: the plain one (bare-base batches) and
    the LoRA one run with every row on slot 0 (what adapter batches run on): a damaged
    ``lora.onnx`` must fail the gate too."""
    ours = np.concatenate([run_probe(backend), run_probe(backend, graph="lora")])
    result = compare(backend.variant, backend.spec.task, ours, np.concatenate([reference, reference]),
                     backend.spec.onnx.parity)
    result["probes"] = int(reference.shape[0])
    result["graphs"] = ["model.onnx", "lora.onnx"]
    return result


def compare(variant: str, task: str, ours: np.ndarray, ref: np.ndarray, spec: ParitySpec) -> dict:
    """Parity of ``ours`` against the torch reference ``ref`` (same probe rows)."""
    if ours.shape != ref.shape:
        return {"passed": False, "probes": int(ref.shape[0]),
                "reason": f"output shape {list(ours.shape)} differs from torch's {list(ref.shape)}"}
    finite = bool(np.all(np.isfinite(ours)))
    diff = float(np.abs(ours - ref).max()) if finite else float("inf")
    cos = (ours * ref).sum(1) / np.maximum(
        np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    result = {
        "probes": int(ref.shape[0]),
        "max_abs_diff": diff,
        "mean_cosine": float(cos.mean()) if finite else 0.0,
        "min_cosine": float(cos.min()) if finite else 0.0,
    }
    if task == "classify":
        result["label_agreement"] = float((ours.argmax(1) == ref.argmax(1)).mean())
    failures = []
    if not finite:
        failures.append("outputs are not finite")
    elif variant == "onnx-int8":
        if result["mean_cosine"] < spec.int8_cosine:
            failures.append(f"mean cosine {result['mean_cosine']:.5f} < {spec.int8_cosine}")
        if task == "classify" and result["label_agreement"] < spec.int8_label_agreement:
            failures.append(
                f"label agreement {result['label_agreement']:.3f} < {spec.int8_label_agreement}")
        result["thresholds"] = {"int8_cosine": spec.int8_cosine}
        if task == "classify":
            result["thresholds"]["int8_label_agreement"] = spec.int8_label_agreement
    else:
        if diff > spec.fp32_max_abs_diff:
            failures.append(f"max abs diff {diff:.3g} > {spec.fp32_max_abs_diff:g}")
        result["thresholds"] = {"fp32_max_abs_diff": spec.fp32_max_abs_diff}
    result["passed"] = not failures
    if failures:
        result["reason"] = "parity with torch failed: " + "; ".join(failures)
    return result
