"""Build the ONNX variants of a catalog base: export, LoRA inputs, int8, cache, parity.

Pipeline (``ensure_variants``), each step printed with its time:

1. export the encoder with optimum (``main_export``, task ``feature-extraction``, the legacy
   torch exporter: node names follow module names, which step 2 relies on), then give its
   reshapes constant targets (``models.variants.shapes``: the per-call shape arithmetic goes);
2. ``lora.onnx``: the same graph with LoRA stacks as inputs (``models.onnx_graph``);
3. ``onnx-int8``: first SmoothQuant and the first feed-forward output projections kept fp32
   (``models.variants.smoothing.recipe``; activation ranges from real calibration sentences the
   probe never reads), then optimum's ``ORTQuantizer`` with the dynamic config of this CPU's
   instruction set (``cpu_quantization``: avx512_vnni / avx512 / avx2 / arm64), per-channel
   weights; the LoRA branches and the attention-score products (activation x activation) stay
   fp32. What was chosen (ISA, alpha, the fp32 MatMuls) is in the manifest's ``int8``;
4. ONNX Runtime graph optimization, applied offline at the ``extended`` level (fusions that are
   portable across x86 CPUs) and saved; sessions add the configured level when they open;
5. a seeded random probe adapter (``write_probe_adapter``), the torch references on the probe
   set (``models.variants.probe.run_probe``: bare, and with the probe adapter on every other row) and each
   variant's parity result, written to its ``manifest.json``.

The cache layout and key are ``models.variants.cache``'s. A build runs under a file lock
(replicas of one machine wait for one build) into a scratch folder renamed into place, so readers never see half a variant.
``force=True`` rebuilds and, if the rebuilt variants pass parity, replaces the files of an
existing key one by one (atomic renames): running replicas notice and switch once the new files
pass parity in them too.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.errors import ModelLoadError
from models.sources import resolve_source
from models.spec import ONNX_VARIANTS, ModelSpec
from models.variants.cache import (
    FILES,
    MANIFEST,
    PROBE_ADAPTER,
    REFERENCE,
    REFERENCE_ADAPTER,
    build_settings,
    checkpoint_digest,
    complete,
    references,
    tool_versions,
    variant_root,
)
from models.variants.parity import check_variant
from models.variants.probe import PROBE_KEY, probe_adapter_check, run_probe, write_probe_adapter

Progress = Callable[[str], None]


def ensure_variants(
    spec: ModelSpec, cache: Path, *, force: bool = False, progress: Progress | None = None,
) -> Path:
    """The folder holding this model's ONNX variants, built first when missing (or ``force``)."""
    say = progress or (lambda msg: None)
    source = resolve_source(spec.source)
    root = variant_root(spec, source, cache)
    if not force and complete(root):
        say(f"{spec.id}: ONNX variants cached in {root}")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may have built it meanwhile
        if not force and complete(root):
            return root
        for stale in root.parent.glob(".build-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)  # (we hold the lock: none is running)
        scratch = root.parent / f".build-{root.name}-{os.getpid()}"
        try:
            _build(spec, source, scratch, say)
            failed = [v for v in ONNX_VARIANTS if not json.loads(
                (scratch / v / MANIFEST).read_text())["parity_at_build"]["passed"]]
            if failed and root.exists():
                raise ModelLoadError(
                    f"{spec.id}: the rebuilt {', '.join(failed)} failed parity; the files in "
                    f"{root} were left as they were")
            if root.exists():  # replace file by file: running replicas may be reading them
                for variant in ONNX_VARIANTS:
                    (root / variant).mkdir(parents=True, exist_ok=True)
                    for name in (*FILES, MANIFEST):
                        os.replace(scratch / variant / name, root / variant / name)
                for name in (REFERENCE, REFERENCE_ADAPTER):
                    os.replace(scratch / name, root / name)
                shutil.rmtree(root / PROBE_ADAPTER, ignore_errors=True)
                os.replace(scratch / PROBE_ADAPTER, root / PROBE_ADAPTER)
            else:
                os.rename(scratch, root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return root


def _build(spec: ModelSpec, source: Path, out: Path, say: Progress) -> None:
    import onnx

    from models.onnx_backend import OnnxBackend
    from models.onnx_graph import add_lora_inputs
    from models.variants.shapes import static_shapes

    settings = build_settings(spec)
    raw = out / "export"
    t = time.perf_counter()
    say(f"{spec.id}: exporting {source} to ONNX with optimum ...")
    _export(source, raw)
    say(f"{spec.id}: exported in {time.perf_counter() - t:.1f} s")
    model = onnx.load(str(raw / "model.onnx"))
    if settings["static_shapes"]:
        folded = static_shapes(model)
        onnx.save(model, str(raw / "model.onnx"))
        say(f"{spec.id}: static shapes: {folded['reshapes']} reshape targets and {folded['shape_constants']} "
            f"shape reads made constant, {folded['nodes_removed']} nodes dropped")
    maxima = _calibrate(spec, source, model, settings)
    modules = add_lora_inputs(model)
    onnx.save(model, str(raw / "lora.onnx"))
    say(f"{spec.id}: LoRA inputs on {len(modules)} linear layers")
    for variant in ONNX_VARIANTS:
        t = time.perf_counter()
        dest = out / variant
        dest.mkdir(parents=True)
        for name in FILES:
            src = raw / name
            if variant == "onnx-int8":
                src, int8 = _quantize(src, out / "quantized", settings, maxima)
            _optimize_offline(src, dest / name)
        say(f"{spec.id}: {variant} built in {time.perf_counter() - t:.1f} s")
    shutil.rmtree(raw)
    shutil.rmtree(out / "quantized", ignore_errors=True)
    t = time.perf_counter()
    write_probe_adapter(spec, source, out / PROBE_ADAPTER)
    reference = torch_reference(spec, source)
    np.save(out / REFERENCE, reference)
    np.save(out / REFERENCE_ADAPTER, torch_reference(spec, source, out / PROBE_ADAPTER))
    say(f"{spec.id}: torch references on {len(reference)} probe sentences (bare, and with a "
        f"probe adapter on every other row) in {time.perf_counter() - t:.1f} s")
    for variant in ONNX_VARIANTS:
        manifest = {
            "model": spec.id,
            "variant": variant,
            "source": str(source),
            "checkpoint_sha256": checkpoint_digest(source),
            "settings": settings,
            "versions": tool_versions(),
            "modules": {m: list(d) for m, d in modules.items()},
            **({"int8": int8} if variant == "onnx-int8" else {}),
            "built_at": int(time.time()),
        }
        (out / variant / MANIFEST).write_text(json.dumps(manifest, indent=1))
        backend = OnnxBackend(spec, source, variant, out / variant)
        backend.load()
        parity = check_variant(backend, *references(out))
        manifest["parity_at_build"] = parity
        (out / variant / MANIFEST).write_text(json.dumps(manifest, indent=1))
        say(f"{spec.id}@{variant}: parity {'passed' if parity['passed'] else 'FAILED'} "
            f"(max abs diff {parity['max_abs_diff']:.2g}, mean cosine {parity['mean_cosine']:.5f})")


def _export(source: Path, dest: Path) -> None:
    import warnings

    import torch
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    # Harmless third-party noise, filtered here where it arises: the tracer's note that the
    # attention mask's constant is traced as a constant (it is one), and transformers' notice
    # that optimum still passes `torch_dtype`.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            main_export(
                str(source), output=str(dest), task="feature-extraction", do_validation=False,
                no_post_process=True, library_name="transformers", trust_remote_code=False,
            )
    except Exception as exc:  # optimum raises many kinds; the model is what failed
        raise ModelLoadError(f"cannot export {source} to ONNX: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def _calibrate(spec: ModelSpec, source: Path, model, settings: dict) -> dict[str, np.ndarray] | None:
    """Per-channel activation maxima of the MatMul inputs SmoothQuant may smooth, over the
    calibration sentences run through the exported fp32 graph (batches of 32)."""
    if not settings["smoothquant"]:
        return None
    from transformers import AutoTokenizer

    from models.variants.smoothing import calibration_texts, channel_maxima, matmul_groups

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    inputs = {i.name for i in model.graph.input}
    texts = calibration_texts()
    limit = settings["outputs"]["max_input_tokens"] or tokenizer.model_max_length
    batches = []
    for i in range(0, len(texts), 32):
        enc = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=min(limit, 512),
                        return_tensors="np")
        batches.append(({k: v.astype(np.int64) for k, v in enc.items() if k in inputs}, enc["attention_mask"]))
    names = list(matmul_groups(model, _quantizable))
    return channel_maxima(model, names, batches)


def _quantizable(node) -> bool:
    """Not the LoRA branches, not activation x activation."""
    return "/lora/" not in node.name and not _attention_product(node)


def _quantize(src: Path, work: Path, settings: dict, maxima: dict | None) -> tuple[Path, dict]:
    import onnx
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from models.variants.smoothing import recipe

    model = onnx.load(str(src))
    info: dict = {"isa": settings["quantization"], "per_channel": settings["per_channel"], "smoothquant": None}
    fp32: list[str] = []
    if maxima is not None:
        sq = settings["smoothquant"]
        info["smoothquant"] = recipe(model, _quantizable, maxima, sq["alpha"], sq["fp32_ffn_share"])
        # and the embedding tables: int8 tables cost accuracy on every token, a Gather gains nothing
        fp32 = info["smoothquant"]["fp32_matmuls"] + [n.name for n in model.graph.node if n.op_type == "Gather"]
        work.mkdir(parents=True, exist_ok=True)
        src = work / f"{src.stem}_smoothed.onnx"
        onnx.save(model, str(src))
    keep_fp32 = [n.name for n in model.graph.node if not _quantizable(n)] + fp32
    config = getattr(AutoQuantizationConfig, settings["quantization"])(
        is_static=False, per_channel=settings["per_channel"], nodes_to_exclude=keep_fp32)
    quantizer = ORTQuantizer.from_pretrained(src.parent, file_name=src.name)
    quantizer.quantize(save_dir=work, quantization_config=config, file_suffix="int8")
    return work / f"{src.stem}_int8.onnx", info


def _attention_product(node) -> bool:
    """Q x K^T and softmax x V: both operands are activations; int8 there costs accuracy."""
    return node.op_type == "MatMul" and node.name.split("/")[-1] in ("MatMul", "MatMul_1") \
        and "/attention/self/" in node.name and node.name.count("/") == 5


def _optimize_offline(src: Path, dest: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dest)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def torch_reference(spec: ModelSpec, source: Path, adapter: Path | None = None) -> np.ndarray:
    """The served torch backend's outputs on the probe set: what parity compares against.
    With ``adapter``, every other row runs it (``models.variants.probe.run_probe``)."""
    from models.torch_backend import TorchBackend  # a cache hit never imports torch

    backend = TorchBackend(spec, source)
    backend.load()
    try:
        if adapter is None:
            return run_probe(backend)
        check = probe_adapter_check(spec, source, adapter)
        backend.add_adapter(PROBE_KEY, check, check.task, check.labels)
        return run_probe(backend, adapter=PROBE_KEY)
    finally:
        backend.close()


