"""SmoothQuant (Xiao et al., 2023) on an exported encoder graph, before dynamic int8 quantization.

Dynamic int8 gives each activation tensor one scale; a few channels of a transformer's
activations are far larger than the rest, so the rest lose their precision, and on inputs of a
few tokens every token counts (minilm's cosine against fp32 fell to 0.96 on "thank you").
Smoothing divides input channel ``j`` of a MatMul by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
(a Mul in front of it) and multiplies row ``j`` of its constant weight by ``s_j``: the product is
the same in exact arithmetic, and both operands quantize better. The channel maxima come from
calibration inputs, never from the texts a parity check or a benchmark then reads. MatMuls that
read the same tensor (query, key and value) share one Mul and one ``s``.

Not wired into the build yet: ``models.variants.build`` still quantizes the plain graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

Batch = tuple[dict[str, np.ndarray], np.ndarray]  # (the session's feed, attention mask [batch, seq])


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
