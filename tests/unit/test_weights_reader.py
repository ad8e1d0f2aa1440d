"""Our torch-free safetensors reader against the safetensors library's own torch loader, and
the files it must refuse (with ``InvalidAdapter``, never another exception)."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.adapters.weights import read_safetensors_header, read_tensors
from models.errors import InvalidAdapter, ModelLoadError, VariantNotFound
from models.factory import create_backend
from models.spec import ModelSpec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int8, torch.uint8, torch.bool])
def test_reads_what_torch_reads(tmp_path, dtype):
    torch.manual_seed(0)
    tensors = {
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(4, 32),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 5),
        "ints": torch.arange(-6, 6).reshape(3, 4),
    }
    tensors = {k: (v > 0 if dtype is torch.bool else v.to(dtype)) for k, v in tensors.items()}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    ours = read_tensors(path)
    theirs = load_file(str(path))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        assert ours[name].shape == want.shape and ours[name].dtype == want.dtype, name
        np.testing.assert_array_equal(ours[name], want)
        assert ours[name].flags.writeable  # a copy: the file's bytes are not kept


def _raw(path, header: object, data: bytes = b"") -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize("case, header, data", [
    ("not an object", [1, 2], b""),
    ("past the end", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    ("fp8", {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2),
    ("no offsets", {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
])
def test_refuses_bad_files_at_validation_and_at_read(tmp_path, case, header, data):
    path = tmp_path / "bad.safetensors"
    _raw(path, header, data)
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        read_safetensors_header(path)  # validation reads this: refused before registration
    with pytest.raises(InvalidAdapter):
        read_tensors(path)


def test_factory_builds_nothing(tiny_models, tmp_path):
    """An ONNX variant that is not in the cache is refused with the fix named; no export runs."""
    spec = ModelSpec(id="tiny", source=str(tiny_models["embed"]), task="embed",
                     variants=("torch", "onnx"))
    with pytest.raises(ModelLoadError, match="loraserve export"):
        create_backend(spec, "onnx", tmp_path / "empty-cache")
    assert not (tmp_path / "empty-cache").exists()
    with pytest.raises(VariantNotFound):
        create_backend(spec, "onnx-int8", tmp_path)
    assert create_backend(spec, "torch").variant == "torch"
