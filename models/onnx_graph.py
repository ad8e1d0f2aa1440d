"""ONNX graphs: the LoRA rewrite of an exported encoder, and the checks a file passes before
ONNX Runtime may open it.

LoRA as graph inputs (``add_lora_inputs``): every ``MatMul`` of an exported linear layer
(``/encoder/layer.0/attention/self/query/MatMul`` with a 2-D weight initializer) gets a
branch ``y += (x @ Gather(lora_A.<module>, lora_index)) @ Gather(lora_B.<module>, lora_index)``
with graph inputs ``lora_index: int64 [batch or 1]``, ``lora_A.<module>: [slots, in, r]`` and
``lora_B.<module>: [slots, r, out]``. Those are the stacks ``models.lora_slots`` keeps for
torch: slot 0 is zeros (the bare base), each row picks its adapter's slot, so one run mixes
adapters. A ``lora_index`` of length 1 broadcasts one slot over the batch (no gather per row).

Safety (``check_model_file``): the file must parse as ONNX, use only the standard and
``com.microsoft`` operator domains, and keep any external data inside its own directory. A file
that fails raises ``ModelLoadError`` with what is wrong; nothing of it reaches a session.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import ModelLoadError

LORA_INDEX = "lora_index"
# Operator domains ONNX Runtime's CPU build implements itself (no custom-op library needed).
ALLOWED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc"}
MAX_MODEL_BYTES = 4 << 30


def lora_input_names(module: str) -> tuple[str, str]:
    return f"lora_A.{module}", f"lora_B.{module}"


def linear_modules(model) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of every exported linear layer (a MatMul by a 2-D initializer,
    named after its module by the torch exporter)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.name.endswith("/MatMul"):
            continue
        dims = inits.get(node.input[1])
        if dims is None or len(dims) != 2:
            continue
        found[node.name[1:-len("/MatMul")].replace("/", ".")] = (int(dims[0]), int(dims[1]))
    return found


def add_lora_inputs(model) -> dict[str, tuple[int, int]]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place) to take LoRA stacks as inputs.
    Returns the adapted modules with their ``(in, out)``. Nodes are inserted right after the
    MatMul they extend, so the graph stays topologically sorted."""
    from onnx import TensorProto, helper

    graph = model.graph
    modules = linear_modules(model)
    graph.input.append(helper.make_tensor_value_info(LORA_INDEX, TensorProto.INT64, ["lora_rows"]))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        module = node.name[1:-len("/MatMul")].replace("/", ".") if node.op_type == "MatMul" else None
        if module not in modules:
            continue
        d_in, d_out = modules[module]
        a, b = lora_input_names(module)
        rank = f"rank.{module}"
        graph.input.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, ["slots", d_in, rank]))
        graph.input.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, ["slots", rank, d_out]))
        y = node.output[0]
        base = f"{y}/base"
        node.output[0] = base
        scope = node.name[: -len("/MatMul")] + "/lora"
        nodes += [
            helper.make_node("Gather", [a, LORA_INDEX], [f"{scope}/A"], axis=0, name=f"{scope}/GatherA"),
            helper.make_node("Gather", [b, LORA_INDEX], [f"{scope}/B"], axis=0, name=f"{scope}/GatherB"),
            helper.make_node("MatMul", [node.input[0], f"{scope}/A"], [f"{scope}/xA"], name=f"{scope}/MatMulA"),
            helper.make_node("MatMul", [f"{scope}/xA", f"{scope}/B"], [f"{scope}/delta"], name=f"{scope}/MatMulB"),
            helper.make_node("Add", [base, f"{scope}/delta"], [y], name=f"{scope}/Add"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return modules


def lora_node_names(model) -> list[str]:
    """Nodes of the LoRA branches: kept in fp32 when the rest is quantized."""
    return [n.name for n in model.graph.node if "/lora/" in n.name]


def check_model_file(path: Path) -> None:
    """Refuse what must not reach ONNX Runtime: unreadable or non-ONNX bytes, custom operator
    domains (code we do not ship), external data outside the model's directory."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist")
    size = path.stat().st_size
    if size == 0 or size > MAX_MODEL_BYTES:
        raise ModelLoadError(f"ONNX file {path} has {size} bytes (allowed: 1 to {MAX_MODEL_BYTES})")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path.name} is not a readable ONNX model: {exc}") from None
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(f"{path.name} is not a readable ONNX model: it has no graph")
    # nodes, not opset imports: ORT's optimizer imports every domain it knows into what it saves
    domains = {n.domain for n in model.graph.node}
    domains |= {n.domain for f in model.functions for n in f.node}
    bad = sorted(d for d in domains if d not in ALLOWED_DOMAINS)
    if bad:
        raise ModelLoadError(
            f"{path.name} uses operator domains {bad}; only the standard ONNX and com.microsoft "
            "operators are accepted (custom operators would run code we do not ship)"
        )
    root = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelLoadError(
                f"{path.name}: tensor {tensor.name!r} points at external data {location!r} outside "
                "the model's directory"
            )
