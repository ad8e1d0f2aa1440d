"""The parity gate: an ONNX variant serves only when its outputs match torch's on a probe set.

The probe set and probe adapter are in ``models.variants.probe``. The reference is what the
served torch backend returns for them (pooled embeddings, or class probabilities), computed once
per checkpoint and cached with the variants. Rules (thresholds in ``ModelSpec.onnx.parity``):

- ``onnx`` (fp32): the largest absolute difference of any output component <= ``fp32_max_abs_diff``;
- ``onnx-int8``: mean cosine similarity to the reference >= ``int8_cosine``, every probe
  input's >= ``int8_min_cosine`` and, for a classifier, top-label agreement >= ``int8_label_agreement``.

The result is a plain dict: it travels to ``/v1/models`` as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.spec import ParitySpec
from models.variants.probe import PROBE_KEY, probe_adapter_check, run_probe


def check_variant(backend, reference: np.ndarray, adapter_reference: np.ndarray,
                  adapter_dir: Path) -> dict:
    """Parity of an ONNX backend on both of its graphs: the plain one (bare-base batches), the
    LoRA one with every row on the zero slot, and the LoRA one with a seeded random probe
    adapter (``models.variants.probe``) on every other row, against torch
    running the same adapter: so the adapter path (gathers, scale, per-row slots, pooler) is
    gated too. The probe adapter is removed again before the backend serves."""
    spec = backend.spec
    ours = np.concatenate([run_probe(backend), run_probe(backend, graph="lora")])
    result = compare(backend.variant, spec.task, ours, np.concatenate([reference, reference]),
                     spec.onnx.parity)
    check = probe_adapter_check(spec, backend.path, Path(adapter_dir))
    backend.add_adapter(PROBE_KEY, check, check.task, check.labels)
    try:
        adapted = run_probe(backend, adapter=PROBE_KEY)
    finally:
        backend.remove_adapter(PROBE_KEY)
    # random heads can tie: labels are compared on the bare base only
    with_adapter = compare(backend.variant, "embed", adapted, adapter_reference, spec.onnx.parity)
    result["adapter_probe"] = {k: with_adapter[k] for k in ("max_abs_diff", "mean_cosine", "min_cosine")}
    if not with_adapter["passed"]:
        result["passed"] = False
        reason = with_adapter["reason"].replace("parity with torch failed: ", "")
        result["reason"] = (result.get("reason", "parity with torch failed") + "; with the probe adapter: " + reason)
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
        if result["min_cosine"] < spec.int8_min_cosine:
            failures.append(f"min cosine {result['min_cosine']:.5f} < {spec.int8_min_cosine}")
        result["thresholds"] = {"int8_cosine": spec.int8_cosine, "int8_min_cosine": spec.int8_min_cosine}
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
