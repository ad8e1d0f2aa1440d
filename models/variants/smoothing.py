"""SmoothQuant (Xiao et al., 2023) on an exported encoder graph, before dynamic int8 quantization.

Dynamic int8 gives each activation tensor one scale; a few channels of a transformer's
activations are far larger than the rest, so the rest lose their precision, and on inputs of a
few tokens every token counts (minilm's plain int8 build: least cosine 0.948, on "thank you!",
in ``loadtest/results/variants-build.md``).
Smoothing divides input channel ``j`` of a MatMul by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
(a Mul in front of it) and multiplies row ``j`` of its constant weight by ``s_j``: the product is
the same in exact arithmetic, and both operands quantize better. The channel maxima come from
calibration inputs, never from the texts a parity check or a benchmark then reads. MatMuls that
read the same tensor (query, key and value) share one Mul and one ``s``.

Smoothing alone is not enough. ``recipe`` (what ``models.variants.build`` runs) also keeps the
first ``fp32_share`` of the feed-forward output projections in fp32, unsmoothed (they read GELU's
one-sided, heavy-tailed output: int8 there fails on short inputs whatever ``alpha``), and zeroes
the padding after the embeddings (``zero_padding``); the build keeps the embedding tables fp32
too. On all-MiniLM-L6-v2 (AVX2, ad hoc sweeps over these choices) each part was needed for a
minimum cosine of 0.99 on inputs of one to three words batched with others; the committed
result of the whole recipe, beside the plain build, is ``loadtest/results/variants-build.md``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.variants.probe import CALIBRATION_TEXTS, SHORT_WORDS, snippet_texts

Batch = tuple[dict[str, np.ndarray], np.ndarray]  # (the session's feed, attention mask [batch, seq])


def calibration_texts(n: int = CALIBRATION_TEXTS, seed: int = 0) -> list[str]:
    """``n`` real sentences of more than three words (the VADER snippets), a seeded sample: what
    the activation ranges are read from. The parity probe's short inputs (one to three words,
    ``models.variants.probe``) are never among them, nor are its 64 sentences."""
    texts = sorted({t for t in snippet_texts() if len(t.split()) > SHORT_WORDS})
    return random.Random(seed).sample(texts, n)


def gelu_fed(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls (constant weight) whose input is a GELU's output, in graph order: the
    feed-forward output projections. A GELU is a ``Gelu`` node or the exported ``Erf`` form
    (``x * 0.5 * (1 + erf(x / sqrt 2))``: an ``Erf`` within three nodes above the input)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name for i in model.graph.initializer}

    def from_gelu(tensor: str, hops: int = 4) -> bool:
        node = producer.get(tensor)
        if node is None or hops == 0:
            return False
        if node.op_type in ("Gelu", "Erf"):
            return True
        return node.op_type in ("Mul", "Add", "Div") and any(from_gelu(i, hops - 1) for i in node.input)

    return [n for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in consts and from_gelu(n.input[0])]


def zero_padding(model: onnx.ModelProto) -> str | None:
    """Multiply the embeddings' output (the first ``LayerNormalization``) by the attention mask,
    in place; returns the masked tensor's name (None: no such node or no ``attention_mask``).

    Dynamic int8 takes one scale per tensor, over the whole batch, padding included, and padding
    positions carry large activations: a short input padded beside a long one lost most of its
    precision (minilm, batches of 16, ad hoc: the least cosine of the short inputs fell by about
    0.01 against one input per call; this Mul gave it back).
    Real tokens never attend to padding, so their outputs do not change."""
    if "attention_mask" not in {i.name for i in model.graph.input}:
        return None
    at = next((i for i, n in enumerate(model.graph.node) if n.op_type == "LayerNormalization"), None)
    if at is None:
        return None
    x = model.graph.node[at].output[0]
    masked = f"{x}/padding_zeroed"
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == x:
                n.input[i] = masked
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "/zero_padding/axes"))
    model.graph.node.insert(at + 1, helper.make_node(
        "Cast", ["attention_mask"], ["/zero_padding/mask"], to=onnx.TensorProto.FLOAT, name="/zero_padding/Cast"))
    model.graph.node.insert(at + 2, helper.make_node(
        "Unsqueeze", ["/zero_padding/mask", "/zero_padding/axes"], ["/zero_padding/mask3"], name="/zero_padding/Unsqueeze"))
    model.graph.node.insert(at + 3, helper.make_node(
        "Mul", [x, "/zero_padding/mask3"], [masked], name="/zero_padding/Mul"))
    return masked


def recipe(model: onnx.ModelProto, keep: Callable[[onnx.NodeProto], bool], maxima: dict[str, np.ndarray],
           alpha: float, fp32_share: float) -> dict:
    """Prepare ``model`` in place for int8: the first ``fp32_share x count`` (rounded) GELU-fed MatMuls
    stay fp32 (returned, for the quantizer to exclude), the other MatMuls ``keep`` accepts are
    smoothed with ``maxima`` (``channel_maxima`` of the same graph's tensors), and padding is
    zeroed after the embeddings (``zero_padding``)."""
    ffn = gelu_fed(model)
    fp32 = [n.name for n in ffn[:math.floor(fp32_share * len(ffn) + 0.5)]]  # the nearest count
    groups = matmul_groups(model, lambda n: keep(n) and n.name not in fp32)
    muls = smooth(model, groups, maxima, alpha)
    zeroed = zero_padding(model)
    return {"padding_zeroed_after": zeroed, "alpha": alpha, "smoothed_matmuls": sum(len(g) for g in groups.values()), "smoothing_muls": muls,
            "fp32_matmuls": fp32}


def matmul_groups(model: onnx.ModelProto, keep: Callable[[onnx.NodeProto], bool]) -> dict[str, list[onnx.NodeProto]]:
    """The MatMuls with a constant weight that ``keep`` accepts, by the activation they read."""
    consts = {i.name for i in model.graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in consts and keep(n):
            out.setdefault(n.input[0], []).append(n)
    return out


def channel_maxima(model: onnx.ModelProto, names: list[str], batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """Per channel, the largest ``|x|`` of each tensor in ``names`` over the real (unmasked) tokens
    of ``batches``. (The graph is serialized whole: encoders, well under protobuf's 2 GB.)"""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed, mask in batches:
        for name, x in zip(names, session.run(names, feed)):
            rows = x[mask.astype(bool)] if x.ndim == 3 else x.reshape(-1, x.shape[-1])
            m = np.abs(rows).max(axis=0)
            maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima


def smooth(model: onnx.ModelProto, groups: dict[str, list[onnx.NodeProto]], maxima: dict[str, np.ndarray],
           alpha: float) -> int:
    """Smooth every group in place (``groups`` from ``matmul_groups`` on this ``model``); returns
    the number of Muls inserted."""
    inits = {i.name: i for i in model.graph.initializer}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    inserts = []
    for k, (x, nodes) in enumerate(groups.items()):
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]  # [in, out] each
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.maximum(maxima[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"smoothquant/inv_{k}")
        model.graph.initializer.append(inv)
        smoothed = f"{x}/smoothed_{k}"
        for n, w in zip(nodes, weights):
            n.input[0] = smoothed
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), n.input[1]))
        mul = helper.make_node("Mul", [x, inv.name], [smoothed], name=f"/smoothquant/Mul_{k}")
        inserts.append((min(order[n.name] for n in nodes), mul))
    for at, mul in sorted(inserts, key=lambda t: t[0], reverse=True):  # from the end: indices stay valid
        model.graph.node.insert(at, mul)
    return len(inserts)
