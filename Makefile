# The two commands: `make up` serves the default model, `make test` runs the suite.
# Both create or refresh .venv from pyproject.toml (+ constraints.txt) when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/local.yaml
# The CPU wheel of torch; installed first so nothing pulls a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: up test install bench bench-adapters bench-variants locust adapters clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,onnx,train]"
	touch $(STAMP)

up: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/loraserve up --config $(CONFIG)

# Lint and import contracts first (seconds), then unit, model and integration tests.
test: $(STAMP)
	$(VENV)/bin/ruff check serve models tests
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) loadtest/bench_embeddings.py $(BENCH_ARGS)

# Against a running `make up`: Zipf popularity over the served adapters, SLO checked at the end.
LOCUST_ARGS ?= -u 32 -r 8 -t 60s
locust: $(STAMP)
	$(VENV)/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless $(LOCUST_ARGS)

bench-adapters: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) loadtest/bench_adapters.py $(BENCH_ARGS)

bench-variants: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) loadtest/bench_variants.py $(BENCH_ARGS)

adapters: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m models.training.finetune --train models/data/sentiment/train.jsonl --eval models/data/sentiment/test.jsonl --out adapters/sentiment --overwrite
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m models.training.finetune --train models/data/topic/train.jsonl --eval models/data/topic/test.jsonl --out adapters/topic --overwrite

clean:
	rm -rf $(VENV) .pytest_cache
