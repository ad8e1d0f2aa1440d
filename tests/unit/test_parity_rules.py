"""The parity gate's rules for int8: the mean cosine, and every single input's cosine (one bad
short input fails the variant even when the mean is fine)."""

import numpy as np

from models.spec import ParitySpec
from models.variants.parity import compare


def rows(n: int = 100, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_one_input_below_the_least_cosine_fails_int8_although_the_mean_passes():
    ref = rows()
    ours = ref.copy()
    ours[7] = 0.8 * ref[7] + 0.2 * rows(1, seed=1)[0]  # one input off by about 1-2%
    cos = float((ours[7] @ ref[7]) / np.linalg.norm(ours[7]))
    assert 0.97 < cos < 0.99
    result = compare("onnx-int8", "embed", ours, ref, ParitySpec())
    assert result["mean_cosine"] > 0.9995 and not result["passed"]
    assert abs(result["min_cosine"] - cos) < 1e-6
    assert result["reason"] == f"parity with torch failed: min cosine {result['min_cosine']:.5f} < 0.99"
    assert result["thresholds"] == {"int8_cosine": 0.99, "int8_min_cosine": 0.99}
    looser = compare("onnx-int8", "embed", ours, ref, ParitySpec(int8_min_cosine=0.9))
    assert looser["passed"] and "reason" not in looser


def test_fp32_is_held_to_the_absolute_difference_not_the_cosine():
    ref = rows()
    ours = ref + 2e-4
    result = compare("onnx", "embed", ours, ref, ParitySpec())
    assert not result["passed"] and "max abs diff" in result["reason"]
