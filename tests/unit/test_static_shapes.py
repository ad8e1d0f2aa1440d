"""models.variants.shapes on a graph written the way the legacy exporter writes attention's
reshapes and scale: same outputs for every batch and length, the shape arithmetic gone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.variants.shapes import static_shapes


def exported_like() -> onnx.ModelProto:
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
        helper.make_node("Unsqueeze", ["t", "axes0"], ["t1"]),
        helper.make_node("Concat", ["b1", "t1", "heads"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),  # [B, T, 8] -> [B, T, 2, 4]
        helper.make_node("Transpose", ["r"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["q"], ["qs"]),
        helper.make_node("Slice", ["qs", "minus1", "big"], ["d"]),  # the head size, 4
        helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["df"], ["scale"]),
        helper.make_node("Div", ["q", "scale"], ["y"]),
    ]
    inits = [i64("zero", 0), i64("one", 1), i64("axes0", [0]), i64("heads", [2, 4]),
             i64("minus1", [-1]), i64("big", [2**63 - 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "sequence_length", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 2, "sequence_length", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_reshape_targets_and_the_scale_become_constants_and_outputs_do_not_change():
    before = exported_like()
    after = exported_like()
    done = static_shapes(after)
    assert done["reshapes"] == 1 and done["shape_constants"] == 1
    ops = [n.op_type for n in after.graph.node]
    assert "Shape" not in ops and "Concat" not in ops and "Unsqueeze" not in ops
    reshape = next(n for n in after.graph.node if n.op_type == "Reshape")
    target = next(i for i in after.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 0, 2, 4]
    onnx.checker.check_model(after)
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 8), (1, 12, 8), (3, 7, 8), (32, 5, 8)]:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("src,dst,want", [
    (["b", "t", 384], ["b", "t", 12, 32], [0, 0, 12, 32]),
    (["b", "t", 12, 32], ["b", "t", 384], [0, 0, 384]),
    (["b", "t"], ["t", "b"], None),  # two sizes unknown to a constant target: left alone
    (None, ["b", 4], None),
])
def test_a_reshape_target_is_constant_only_where_it_can_be(src, dst, want):
    from models.variants.shapes import _reshape_target

    assert _reshape_target(src, dst) == want
