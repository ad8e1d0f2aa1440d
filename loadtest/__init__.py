"""Benchmarks and load tools for loraserve: a small library plus thin scenario scripts.

Library (each module one concept): ``ports`` (free ports), ``service`` (configure, start, watch
and stop the service under test; CPU of process trees), ``load`` (HTTP load with wrk),
``points`` (warm-ups, interleaved repetitions, medians), ``inprocess`` (the backend as a replica
loads it, and the in-process ceiling), ``metrics`` (Prometheus text), ``zipf`` (popularity),
``report`` (results files and the machine facts they carry), ``adapters_kit`` (synthetic
adapters and the admin API), ``recipe_fastapi`` and ``peft_encoder`` (the baselines).

Scenarios, run from the repository root as ``python -m loadtest.<name>`` (``make bench`` runs
them all): ``bench_embeddings``, ``bench_variants``, ``bench_adapters``, ``bench_lora_impl``,
``variant_build``, ``bench_levers``; ``locustfile.py`` is for Locust against a running service.

Benchmarks never touch the network (Hugging Face offline), and relative paths of a config
(adapter stores, variant cache) mean the repository, as for ``make up``.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LORASERVE_HOME", str(Path(__file__).resolve().parents[1]))
