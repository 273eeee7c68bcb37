# Everyday entry points. Every target that runs code depends on `venv`, so a
# fresh clone needs nothing but `make test`.
#
# torch is installed on its own first: the pinned CPU wheel is what this
# machine kind carries (pip's local wheel dir), and installing it alone keeps
# the resolver from ever reaching for a CUDA build while it solves the rest.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k cli -x"`.
PYTEST_ARGS ?=
PYTEST := $(BIN)/python -m pytest --durations=15

.PHONY: venv run test test-slow test-all lint bench soak clean

venv: $(STAMP)

# The stamp is rebuilt whenever pyproject.toml changes (new dependencies).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: venv
	$(BIN)/gemini

# The default suite: everything but the slow end-to-end runs (and GPU checks).
test: venv
	$(PYTEST) -m "not slow and not gpu" $(PYTEST_ARGS)

# Only the slow tests (CI runs `test` and then this, so nothing runs twice).
test-slow: venv
	$(PYTEST) -m "slow and not gpu" $(PYTEST_ARGS)

test-all: venv
	$(PYTEST) -m "not gpu" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gemini

# Every benchmark but the soak (a correctness run, not a measurement).
bench: venv
	@set -e; for f in benchmarks/*.py; do \
		[ "$$f" = benchmarks/soak.py ] && continue; \
		echo "== $$f"; \
		$(BIN)/python $$f; \
	done

# Drawn failure schedules, each checked for exactness and leftovers
# (`make soak SOAK_ARGS="--runs 5"` for a short one).
SOAK_ARGS ?= --runs 100 --seed 1
soak: venv
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# Build outputs and tool caches; the venv and outputs/ (runs, MLflow store)
# stay: `rm -rf .venv` for a full reinstall.
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
