"""What building the ONNX variants of a model costs and what they score at the parity gate.

Builds the config's model (default: ``minilm`` of deploy/local.yaml) into a fresh temporary
cache, once with the configured settings and once with per-tensor int8 weights
(``per_channel: false``) for comparison, and reports: the time of each build step (from the
build's own progress lines), and each variant's parity result against torch on the probe set
(max abs diff, mean and least cosine, and the same with the probe adapter on every other row),
with the probe sentences where int8 agrees least.

Usage (from the repository root): ``.venv/bin/python loadtest/variant_build.py [--model minilm]``;
writes loadtest/results/variants-build.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from scriptenv import HERE  # noqa: E402  (first: offline HF; loadtest helpers + repo importable)

import numpy as np  # noqa: E402

import report  # noqa: E402

TITLE = "ONNX variants: build cost and parity with torch"


def build(spec, cache: Path) -> tuple[Path, list[tuple[float, str]]]:
    from models.onnx_export import ensure_variants

    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    root = ensure_variants(spec, cache, progress=lambda m: lines.append((time.perf_counter() - start, m)))
    lines.append((time.perf_counter() - start, "done"))
    return root, lines


def least_agreeing(spec, root: Path, n: int = 3) -> list[tuple[float, str]]:
    """The probe sentences whose int8 output is least like torch's (bare base)."""
    from models.backend import create_backend
    from models.onnx_export import references
    from models.parity import probe_texts, run_probe

    backend = create_backend(spec, "onnx-int8", variant_cache=root.parent.parent)
    backend.load()
    ours, ref = run_probe(backend), references(root)[0]
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    texts = probe_texts()
    return [(float(cos[i]), texts[i]) for i in np.argsort(cos)[:n]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="deploy/local.yaml")
    p.add_argument("--model", default="minilm")
    p.add_argument("--output", default=str(HERE / "results" / "variants-build.md"))
    args = p.parse_args(argv)

    from serve.launcher import app_args, load_config
    from serve.settings import AppSettings

    settings = AppSettings.model_validate(app_args(load_config(args.config)))
    spec = next(m for m in settings.models if m.id == args.model)
    per_tensor = spec.model_copy(update={"onnx": spec.onnx.model_copy(update={"per_channel": False})})
    sections, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="variant-build-") as tmp:
        for label, s in (("configured (per-channel int8)", spec), ("per-tensor int8", per_tensor)):
            root, lines = build(s, Path(tmp) / label.split()[0])
            rows = ["| variant | max abs diff | mean cosine | least cosine | with probe adapter: max abs diff / mean cosine | passed |",
                    "|---|---:|---:|---:|---|---|"]
            for variant in ("onnx", "onnx-int8"):
                parity = json.loads((root / variant / "manifest.json").read_text())["parity_at_build"]
                probe = parity["adapter_probe"]
                rows.append(f"| {variant} | {parity['max_abs_diff']:.2g} | {parity['mean_cosine']:.5f} | "
                            f"{parity['min_cosine']:.4f} | {probe['max_abs_diff']:.2g} / {probe['mean_cosine']:.5f} | "
                            f"{parity['passed']} |")
                raw[f"{label}/{variant}"] = parity
            steps = "\n".join(f"- {t:6.1f} s  {m}" for t, m in lines)
            worst = "\n".join(f"- {c:.4f}  {t!r}" for c, t in least_agreeing(s, root))
            sections.append(f"## {label}\n\nBuild steps (seconds since the start of the build):\n\n"
                            f"{steps}\n\nParity on the probe set:\n\n" + "\n".join(rows)
                            + f"\n\nProbe sentences where int8 agrees least with torch:\n\n{worst}")
    notes = [f"model: {spec.id} ({spec.source}); a fresh temporary cache per build",
             "parity as the gate computes it (models/parity.py); thresholds: fp32 max abs diff "
             f"{spec.onnx.parity.fp32_max_abs_diff:g}, int8 mean cosine {spec.onnx.parity.int8_cosine}"]
    out = Path(args.output)
    text = "\n\n".join(sections)
    out.write_text(report.machine_header(report.command_line(argv), notes, title=TITLE) + "\n" + text + "\n")
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(text)
    print(f"\nwritten to {report.rel(str(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
