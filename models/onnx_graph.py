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
FILES = ("model.onnx", "lora.onnx")  # a variant folder: the plain graph and the LoRA one
MANIFEST = "manifest.json"  # beside them: build settings, adapted modules, parity at build
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


def check_model_file(path: Path) -> bytes:
    """Read ``path`` once, check it (``check_model_bytes``) and return the bytes: the session
    is then created from exactly what was checked, even if the file is replaced meanwhile."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist")
    size = path.stat().st_size
    if size == 0 or size > MAX_MODEL_BYTES:
        raise ModelLoadError(f"ONNX file {path} has {size} bytes (allowed: 1 to {MAX_MODEL_BYTES})")
    data = path.read_bytes()
    check_model_bytes(data, path.name)
    return data


def check_model_bytes(data: bytes, name: str) -> None:
    """Refuse what must not reach ONNX Runtime: bytes that are not an ONNX model, operators of
    domains ONNX Runtime does not implement itself (custom-op code), and any tensor stored as
    external data (our exports never write it; a path in it could point anywhere). Nested
    graphs (``If``/``Loop``/``Scan`` bodies) and functions are checked too."""
    import onnx
    from google.protobuf.message import DecodeError

    if not data:
        raise ModelLoadError(f"{name} has 0 bytes")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{name} is not a readable ONNX model: {exc}") from None
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(f"{name} is not a readable ONNX model: it has no graph")
    # nodes, not opset imports: ORT's optimizer imports every domain it knows into what it saves
    domains: set[str] = set()
    for node, tensors in _walk(model):
        if node is not None:
            domains.add(node.domain)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise ModelLoadError(
                    f"{name}: tensor {tensor.name!r} is stored as external data; only "
                    "self-contained models are accepted"
                )
    bad = sorted(d for d in domains if d not in ALLOWED_DOMAINS)
    if bad:
        raise ModelLoadError(
            f"{name} uses operator domains {bad}; only the standard ONNX and com.microsoft "
            "operators are accepted (custom operators would run code we do not ship)"
        )


def _walk(model):
    """Every node (with the tensors in its attributes) and every initializer, in the main
    graph, in nested graphs and in functions: ``(node or None, tensors)`` pairs."""
    graphs = [model.graph]
    for function in model.functions:
        for node in function.node:
            graphs.extend(_subgraphs(node))
            yield node, _attribute_tensors(node)
    while graphs:
        graph = graphs.pop()
        yield None, list(graph.initializer) + [s.values for s in graph.sparse_initializer]
        for node in graph.node:
            graphs.extend(_subgraphs(node))
            yield node, _attribute_tensors(node)


def _subgraphs(node) -> list:
    out = []
    for attr in node.attribute:
        if attr.HasField("g"):
            out.append(attr.g)
        out.extend(attr.graphs)
    return out


def _attribute_tensors(node) -> list:
    out = []
    for attr in node.attribute:
        if attr.HasField("t"):
            out.append(attr.t)
        out.extend(attr.tensors)
        if attr.HasField("sparse_tensor"):
            out.append(attr.sparse_tensor.values)
    return out
