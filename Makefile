# The two commands: `make up` serves the default model, `make test` runs the suite.
# Both create or refresh .venv from pyproject.toml (+ constraints.txt) when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/local.yaml
# The CPU wheel of torch; installed first so nothing pulls a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: up test install bench bench-deps prometheus-deps cluster-demo autoscale k8s bench-embeddings bench-variants bench-adapters bench-lora-impl bench-generation bench-registry \
        bench-levers bench-variant-build bench-path-budget locust adapters storyteller reproduce clean

install: $(STAMP)

# PYTHONWARNINGS: setuptools' banner about editable installs says nothing a user can act on.
$(STAMP): pyproject.toml constraints.txt
	@echo "installing into $(VENV) (first time: a few minutes) ..."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -c constraints.txt -e ".[dev,onnx,train]"
	touch $(STAMP)

up: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/loraserve up --config $(CONFIG)

# Lint and import contracts first (seconds), then unit, model and integration tests.
test: $(STAMP) prometheus-deps
	$(VENV)/bin/ruff check serve models loadtest ops tests
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q --durations=25 tests --ignore=tests/reproduce $(PYTEST_ARGS)

# Benchmarks (docs/benchmarks.md): `make bench` re-measures every results file in loadtest/results/,
# one scenario after another (about 70 minutes on 2 cores; run it on an otherwise idle machine).
# `make bench QUICK=1`: a smoke run of every scenario (one short repetition each, about 15 minutes;
# written to loadtest/results/quick/, git-ignored). BENCH picks scenarios; BENCH_ARGS go to each
# of them (options they share: --reps, --config); bench-<scenario> runs one, with its own options.
BENCH      ?= bench_embeddings bench_variants bench_adapters bench_lora_impl variant_build bench_levers bench_generation bench_registry bench_path_budget
BENCH_ENV  := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
QUICK_ARG  := $(if $(filter 1,$(QUICK)),--quick,)

bench-deps:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

# Debian's Prometheus (prometheus + promtool) for tests/integration/test_prometheus.py; `make test`
# runs it first. Where there is no apt-get, install Prometheus yourself (the test says so).
prometheus-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || ! command -v apt-get >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

bench: bench-deps $(STAMP)
	@rc=0; for s in $(BENCH); do echo "== loadtest.$$s"; \
	  $(BENCH_ENV) $(PY) -m loadtest.$$s $(QUICK_ARG) $(BENCH_ARGS) || rc=1; done; exit $$rc

bench-embeddings bench-variants bench-adapters bench-lora-impl bench-levers bench-variant-build bench-generation bench-registry bench-path-budget: bench-deps $(STAMP)
	$(BENCH_ENV) $(PY) -m loadtest.$(patsubst bench_variant_build,variant_build,$(subst -,_,$@)) $(QUICK_ARG) $(BENCH_ARGS)

# Against a running `make up`: Zipf popularity over the served adapters, SLO checked at the end.
LOCUST_ARGS ?= -u 32 -r 8 -t 60s
locust: $(STAMP)
	$(VENV)/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless $(LOCUST_ARGS)

# A two-node Ray cluster on this machine (ray start), serve deploy deploy/cluster.yaml, a config
# update under Locust load; report in loadtest/results/cluster-demo.md (docs/cluster.md).
cluster-demo: $(STAMP)
	$(BENCH_ENV) $(PY) -m loadtest.cluster_demo $(DEMO_ARGS)

# Autoscaling seen under a Locust ramp on the two-node cluster (loadtest/results/autoscaling.md)
autoscale: $(STAMP)
	$(BENCH_ENV) $(PY) -m loadtest.autoscale $(DEMO_ARGS)

# k8s/rayservice.yaml from deploy/cluster.yaml and deploy/ray.env
k8s: $(STAMP)
	$(PY) -m ops.k8s

# The demo adapters, rebuilt byte for byte (models/training/demo.py pins the CPU kernels).
adapters: $(STAMP)
	$(PY) -m models.training.demo

# The generative base (a 3.7M-parameter Llama trained on the seeded story corpus; ~16 min on 2 cores).
storyteller: $(STAMP)
	$(PY) -m models.generative.build --out models/data/storyteller

# Retrain both into a temporary folder and compare the weights with the shipped ones (minutes).
reproduce: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests/reproduce

clean:
	rm -rf $(VENV) .pytest_cache
