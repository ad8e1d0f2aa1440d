"""ONNX variants of a base: the cache (layout and key), the build (export, LoRA inputs, int8,
offline optimization), the probe set and the parity gate against torch, and the lifecycle
object a server uses to open, gate, watch and swap a variant. Import the modules themselves;
this package imports nothing (building pulls in torch, optimum and ONNX Runtime)."""
