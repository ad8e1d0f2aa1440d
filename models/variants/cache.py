"""The variant cache: where a base's ONNX variants live and when they are current.

Layout: ``<cache>/<model id>/<key>/{onnx,onnx-int8}/{model.onnx,lora.onnx,manifest.json}``,
``reference.npy``, ``reference-adapter.npy`` and ``probe-adapter/``, where ``key`` hashes the
checkpoint's bytes, the build settings (including what changes torch's outputs and the probe
set) and the versions of the tools. ``models.variants.build`` writes it; backends and the parity
gate read it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np

from models.errors import ModelLoadError
from models.onnx_graph import FILES, MANIFEST
from models.spec import ONNX_VARIANTS, ModelSpec
from models.variants.probe import CALIBRATION_TEXTS, PROBE_STD, probe_texts

REFERENCE = "reference.npy"  # torch, probe set, bare base
PROBE_ADAPTER = "probe-adapter"  # a seeded random LoRA on every linear layer (peft format)
REFERENCE_ADAPTER = "reference-adapter.npy"  # torch, probe set, rows alternating adapter / base
BUILD_FORMAT = 1  # bump when the pipeline changes what it writes


def cpu_quantization() -> str:
    """The dynamic int8 config for this CPU (names of optimum's ``AutoQuantizationConfig``)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if {"avx512_vnni", "avx512vnni"} & flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def build_settings(spec: ModelSpec) -> dict:
    """What the variants and their torch references depend on besides the checkpoint."""
    isa = spec.onnx.quantization
    return {
        "format": BUILD_FORMAT,
        "quantization": cpu_quantization() if isa == "auto" else isa,
        "per_channel": spec.onnx.per_channel,
        "smoothquant": {"alpha": spec.onnx.smoothquant_alpha, "fp32_ffn_share": spec.onnx.int8_fp32_ffn_share,
                        "calibration_texts": CALIBRATION_TEXTS} if spec.onnx.smoothquant else None,
        "static_shapes": spec.onnx.static_shapes,
        "offline_optimization": "extended",
        # the references: the outputs torch computes, on which probe sentences
        "outputs": {"task": spec.task, "normalize": spec.normalize, "pooling": spec.pooling,
                    "max_input_tokens": spec.max_input_tokens},
        "probe_sha256": hashlib.sha256("\n".join(probe_texts()).encode()).hexdigest(),
        "probe_adapter_std": PROBE_STD,
    }


def tool_versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("onnx", "onnxruntime", "optimum", "torch", "transformers")}


_digests: dict[tuple, str] = {}


def checkpoint_digest(path: Path) -> str:
    """sha256 over the checkpoint's files (names and bytes); memoized by size and mtime."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = (str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _digests:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        _digests[stamp] = h.hexdigest()
    return _digests[stamp]


def variant_root(spec: ModelSpec, source: Path, cache: Path) -> Path:
    """Where this checkpoint's variants live for the current settings and tool versions."""
    key = json.dumps({"checkpoint": checkpoint_digest(source), "settings": build_settings(spec),
                      "versions": tool_versions()}, sort_keys=True)
    return Path(cache) / spec.id / hashlib.sha256(key.encode()).hexdigest()[:16]


def complete(root: Path) -> bool:
    return all((root / name).exists() for name in (REFERENCE, REFERENCE_ADAPTER, PROBE_ADAPTER)) and all(
        (root / v / name).is_file() for v in ONNX_VARIANTS for name in (*FILES, MANIFEST))


def existing_root(spec: ModelSpec, source: Path, cache: Path) -> Path:
    """The current variant root, which must be complete: nothing is built here."""
    root = variant_root(spec, source, cache)
    if not complete(root):
        raise ModelLoadError(
            f"the ONNX variants of {spec.id!r} are not built in {cache} for these settings; "
            "run `loraserve export` (or `loraserve up`, which builds them first)")
    return root


def references(root: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """(bare reference, adapter reference, probe adapter folder) of a variant root."""
    return np.load(root / REFERENCE), np.load(root / REFERENCE_ADAPTER), root / PROBE_ADAPTER


def reference_for(spec: ModelSpec, backend) -> tuple[np.ndarray, np.ndarray, Path]:
    """The torch references a variant folder's parity is checked against (built with it)."""
    root = Path(backend.folder).parent
    try:
        return references(root)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{spec.id}: the torch references of {root} are missing ({exc}); "
                             "run `loraserve export --force`") from None
