"""ONNX Runtime implementation of ``Backend`` (variants ``onnx`` and ``onnx-int8``), with LoRA.

A variant folder (``models.variants.build``) holds two graphs of the same encoder: ``model.onnx``
(plain, fastest) and ``lora.onnx`` (LoRA stacks as inputs, ``models.onnx_graph``). A batch of
bare-base rows runs the plain graph; a batch with any adapter row runs the LoRA graph with each
row's slot index (slot 0 = zeros = the bare base), so one run mixes adapters, as the torch path
does. Two graphs rather than one because the LoRA branches (5 nodes per adapted layer) cost
time even with empty stacks: adapter rows run 7-34% slower than bare ones at batch 32
(``loadtest/results/variants.md``), and bare-base batches should not pay that.

The stacks live here as numpy arrays (``Slots``): loading an adapter reads its safetensors and
copies ``A^T`` and ``scale * B^T`` into a free slot; ranks are zero-padded to the module's
largest (exact). The pooler (classification adapters on an embedding base, and classifier bases)
and the classification heads run in numpy after the graph: pooled = tanh(W h[CLS] + b + LoRA),
probs = softmax(head(pooled)), exactly as ``BertForSequenceClassification`` computes them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.adapters.config import WEIGHTS_FILE
from models.adapters.validation import AdapterCheck
from models.adapters.weights import classifier_head, read_lora
from models.backend import Backend, max_input_tokens
from models.errors import InvalidAdapter, ModelLoadError, TaskNotSupported
from models.onnx_graph import FILES, LORA_INDEX, MANIFEST, check_model_file, lora_input_names
from models.slot_book import SlotBook
from models.tokenization import InputEncoder

POOLER = "pooler.dense"
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class Slots(SlotBook):
    """LoRA stacks per module: ``A: [slots, in, r]``, ``B: [slots, r, out]`` (scale folded
    into B). ``stacks`` is replaced whole when it grows, and a new adapter is written into a
    slot no running batch reads, so ``add``/``remove`` may run beside a forward pass."""

    def __init__(self, modules: dict[str, tuple[int, int]], capacity: int):
        super().__init__(capacity)
        self.modules = dict(modules)
        self.stacks = {m: self._zeros(m, self._slots, 1) for m in self.modules}

    def _zeros(self, module: str, slots: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        d_in, d_out = self.modules[module]
        # np.zeros maps untouched pages lazily: capacity costs address space, not memory
        return np.zeros((slots, d_in, rank), np.float32), np.zeros((slots, rank, d_out), np.float32)

    def add(self, name: str, check: AdapterCheck, task: str, labels: tuple[str, ...] = ()) -> None:
        weights = read_lora(check.path / WEIGHTS_FILE, set(self.modules))
        head = None
        if task == "classify":
            w, b, _ = classifier_head(weights.head, labels)
            head = (w, b)
        scale = check.alpha / (math.sqrt(check.rank) if check.use_rslora else check.rank)
        mats = {}
        for module, (a, b) in weights.pairs.items():
            d_in, d_out = self.modules[module]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise InvalidAdapter(f"module {module!r} has malformed LoRA matrices", param="lora_path")
            mats[module] = (a.T, (b * scale).T)  # [in, r], [r, out]
        with self._lock:
            self._check_new(name)
            slot = self._take_slot()
            capacity = self._slots
            stacks = dict(self.stacks)
            for module, (A, B) in stacks.items():
                rank = max(A.shape[2], mats[module][0].shape[1] if module in mats else 1)
                if capacity > A.shape[0] or rank > A.shape[2]:
                    A2, B2 = self._zeros(module, capacity, rank)
                    A2[: A.shape[0], :, : A.shape[2]] = A
                    B2[: B.shape[0], : B.shape[1]] = B
                    stacks[module] = A, B = A2, B2
                A[slot] = 0
                B[slot] = 0
                if module in mats:
                    a, b = mats[module]
                    A[slot, :, : a.shape[1]] = a
                    B[slot, : b.shape[0]] = b
            self.stacks = stacks
            self._commit(name, slot, task, head)


class OnnxBackend(Backend):
    concurrent_adapter_updates = True  # see Slots

    def __init__(self, spec, path: Path, variant: str, folder: Path):
        super().__init__(spec, path)
        self.variant = variant
        self.folder = Path(folder)
        self.files = {name: self.folder / name for name in FILES}
        self.file_sha256: dict[str, str] = {}

    def load(self) -> None:
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer

        if self.spec.task not in ("embed", "classify"):
            raise TaskNotSupported(f"the ONNX backend does not serve {self.spec.task!r}")
        kw = dict(local_files_only=True, trust_remote_code=False)
        try:
            config = AutoConfig.from_pretrained(self.path, **kw)
            tokenizer = AutoTokenizer.from_pretrained(self.path, use_fast=True, **kw)
            manifest = json.loads((self.folder / MANIFEST).read_text())
            modules = {m: tuple(d) for m, d in manifest["modules"].items()}
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {self.spec.id}@{self.variant} from {self.folder}: {exc}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.spec.onnx.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _LEVELS[self.spec.onnx.graph_optimization])
        spin = "1" if self.spec.onnx.spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        sessions = {}
        for name, path in self.files.items():
            data = check_model_file(path)  # the session opens exactly the bytes checked
            try:
                sessions[name] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
                raise ModelLoadError(f"ONNX Runtime refused {path.name} of {self.spec.id}@{self.variant}: {exc}") from None
            self.file_sha256[name] = hashlib.sha256(data).hexdigest()
            del data
        self._check_io(sessions, modules, int(config.hidden_size))
        self.plain, self.lora = sessions["model.onnx"], sessions["lora.onnx"]
        self._plain_inputs = {i.name for i in self.plain.get_inputs()}
        self.graph_modules = modules
        self._pooler, self.base_head = self._read_head_weights()
        slot_modules = dict(modules)
        if self._pooler is not None:
            slot_modules[POOLER] = tuple(self._pooler[0].shape[::-1])
        self.slots = Slots(slot_modules, self.spec.adapters.adapters_per_replica)
        self.dimensions = int(config.hidden_size) if self.spec.task == "embed" else 0
        if self.spec.task == "classify":
            if self.base_head is None or self._pooler is None:
                raise ModelLoadError(f"{self.spec.id}: the checkpoint has no pooler/classifier weights")
            self.labels = tuple(config.id2label[i] for i in range(config.num_labels))
        self.encoder = InputEncoder(tokenizer, max_input_tokens(self.spec, self.path, tokenizer, config))

    def _check_io(self, sessions, modules, hidden: int) -> None:
        for name, sess in sessions.items():
            inputs = {i.name for i in sess.get_inputs()}
            missing = {"input_ids", "attention_mask"} - inputs
            if name == "lora.onnx":
                missing |= {LORA_INDEX, *(n for m in modules for n in lora_input_names(m))} - inputs
            outputs = sess.get_outputs()
            shape = outputs[0].shape if outputs else None  # [batch, seq, hidden]; dims may be names
            wrong = not shape or len(shape) != 3 or (isinstance(shape[-1], int) and shape[-1] != hidden)
            if missing or wrong:
                raise ModelLoadError(
                    f"{name} of {self.spec.id}@{self.variant} is not this model's encoder graph "
                    f"(missing inputs {sorted(missing)[:4]}, output shape {shape})")

    def _read_head_weights(self):
        """Pooler and classifier weights from the checkpoint (numpy; only these tensors)."""
        from safetensors import safe_open

        path = self.path / "model.safetensors"
        if not path.is_file():
            return None, None
        found = {}
        with safe_open(str(path), framework="np") as fh:
            for key in fh.keys():
                for want in ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"):
                    if key == want or key.endswith("." + want):
                        found[want] = fh.get_tensor(key).astype(np.float32)
        pooler = (found["pooler.dense.weight"], found["pooler.dense.bias"]) \
            if "pooler.dense.weight" in found else None
        head = (found["classifier.weight"], found["classifier.bias"]) \
            if "classifier.weight" in found else None
        return pooler, head

    def add_adapter(self, name: str, check: AdapterCheck, task: str, labels: tuple[str, ...] = ()) -> None:
        if task == "classify" and self._pooler is None:
            raise InvalidAdapter(f"{self.spec.id} has no pooler: it cannot serve classification adapters")
        self.slots.add(name, check, task, labels)

    def remove_adapter(self, name: str) -> None:
        self.slots.remove(name)

    def loaded_adapters(self) -> list[str]:
        return list(self.slots.tasks)

    def watched_files(self) -> list[Path]:
        return list(self.files.values())

    def file_digests(self) -> dict[str, str]:
        return dict(self.file_sha256)

    def predict(self, rows: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None,
                graph: str | None = None):
        """``graph="lora"`` runs bare-base rows on the LoRA graph too (the parity gate)."""
        if not rows:
            raise ModelLoadError("predict called with an empty batch")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.encoder.pad_id, dtype=np.int64)  # [batch, seq]
        mask = np.zeros((len(rows), width), dtype=np.int64)  # [batch, seq]
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._plain_inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        names = list(adapters) if adapters is not None else [None] * len(rows)
        slots = self.slots
        stacks = slots.stacks  # one read: a concurrent growth swaps the whole dict
        index = np.array([0 if a is None else slots.slot_of[a] for a in names], dtype=np.int64)
        if not index.any() and graph != "lora":
            hidden = self.plain.run(None, feeds)[0]  # [batch, seq, hidden]
        else:
            feeds[LORA_INDEX] = index[:1] if (index == index[0]).all() else index
            for module in self.graph_modules:
                feeds.update(zip(lora_input_names(module), stacks[module]))
            hidden = self.lora.run(None, feeds)[0]
        kinds = [self._kind(a) for a in names]
        if all(k == kinds[0] for k in kinds):
            return self._outputs(kinds[0], hidden, mask, index, stacks, slice(None))
        result: list[np.ndarray | None] = [None] * len(rows)
        for kind in set(kinds):
            idx = np.array([i for i, k in enumerate(kinds) if k == kind])
            values = self._outputs(kind, hidden, mask, index, stacks, idx)
            for j, i in enumerate(idx):
                result[i] = values[j]
        return result

    def _kind(self, adapter: str | None) -> tuple[str, str | None]:
        if adapter is None:
            return (self.spec.task, None)
        task = self.slots.tasks[adapter]
        return (task, adapter if task == "classify" else None)

    def _outputs(self, kind, hidden, mask, index, stacks, rows) -> np.ndarray:
        task, head_name = kind
        h = hidden[rows]  # [rows, seq, hidden]
        if task == "classify":
            weight, bias = self._pooler
            cls = h[:, 0]  # [rows, hidden]
            pre = cls @ weight.T + bias
            slots = index[rows]
            if slots.any() and POOLER in stacks:
                A, B = stacks[POOLER]
                pre = pre + np.einsum("nr,nro->no", np.einsum("ni,nir->nr", cls, A[slots]), B[slots])
            pooled = np.tanh(pre)
            w, b = self.base_head if head_name is None else self.slots.heads[head_name]
            logits = pooled @ w.T + b  # [rows, labels]
            logits = logits - logits.max(1, keepdims=True)
            e = np.exp(logits)
            return (e / e.sum(1, keepdims=True)).astype(np.float32)
        if self.spec.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = mask[rows][..., None].astype(np.float32)  # [rows, seq, 1]
            pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        if self.spec.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)

    def close(self) -> None:
        super().close()
        self.plain = self.lora = None
