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
# The `slurm`-marked tests need a running cluster (make slurm-up): they join
# `test` and `test-all` only while scripts/slurm.sh's cluster answers.
# Recursive (=), so the check runs only for the targets that use it.
NOT_SLURM = $(if $(shell scripts/slurm.sh status >/dev/null 2>&1 && echo up),, and not slurm)

.PHONY: venv run simulate test test-slow test-all lint bench soak clean slurm-up slurm-down mlflow-server

venv: $(STAMP)

# The stamp is rebuilt whenever pyproject.toml changes (new dependencies).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: venv
	$(BIN)/gemini

# The cluster-scale model (README: Simulating a large cluster), e.g.
# `make simulate SIM_ARGS="nodes=16,128,1000,10000 failures_per_day=1,2,4,8"`.
SIM_ARGS ?=
simulate: venv
	$(BIN)/gemini-simulate $(SIM_ARGS)

# The default suite: everything but the slow end-to-end runs (and GPU checks).
test: venv
	$(PYTEST) -m "not slow and not gpu$(NOT_SLURM)" $(PYTEST_ARGS)

# Only the slow tests (CI runs `test` and then this, so nothing runs twice).
test-slow: venv
	$(PYTEST) -m "slow and not gpu" $(PYTEST_ARGS)

test-all: venv
	$(PYTEST) -m "not gpu$(NOT_SLURM)" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gemini

# Every benchmark but the soak (a correctness run, not a measurement).
# benchmarks/slurm_overhead.py submits to SLURM while the cluster answers,
# else it runs the same tasks through submitit's local executor.
bench: venv
	@set -e; for f in benchmarks/*.py; do \
		[ "$$f" = benchmarks/soak.py ] && continue; \
		echo "== $$f"; \
		if [ "$$f" = benchmarks/slurm_overhead.py ]; then \
			$(BIN)/python $$f --launcher $(if $(NOT_SLURM),submitit_local,slurm); \
		else \
			$(BIN)/python $$f; \
		fi; \
	done

# Drawn failure schedules, each checked for exactness and leftovers
# (`make soak SOAK_ARGS="--runs 5"` for a short one).
SOAK_ARGS ?= --runs 100 --seed 1
soak: venv
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# The paper's evaluation, as far as this machine goes: every figure sweep into
# the default store (the two interleaving sweeps need root for their emulated
# links), the cluster-scale simulation, then the report of all of it
# (README "Reproducing Gemini"). A sweep with a failed job still runs its
# others; the report says which figures lack data.
REPRODUCE_SWEEPS ?= fig7_overhead fig10_wasted fig12_frequency fig14_timeline backends_under_failure idle_spans interleave_ablation
reproduce: venv
	@for s in $(REPRODUCE_SWEEPS); do \
		echo "== gemini -m +sweep=$$s"; \
		$(BIN)/gemini -m +sweep=$$s || echo "sweep $$s: a job failed (see its table)"; \
	done
	$(BIN)/gemini-simulate nodes=16,128,1000,10000 failures_per_day=1,2,4,8
	$(BIN)/gemini-report

# A single-node SLURM cluster on this machine, state under
# ${GEMINI_SLURM_DIR:-/tmp/gemini-slurm}; point a shell at it with
# `eval "$(scripts/slurm.sh env)"`.
slurm-up:
	scripts/slurm.sh up

slurm-down:
	scripts/slurm.sh down

# A light MLflow server over the store jobs record into, in the foreground
# (Ctrl-C stops it): `make mlflow-server PORT=5001` for another port.
PORT ?= 5000
mlflow-server: venv
	$(BIN)/python -m gemini.tracking_server --port $(PORT)

# Build outputs and tool caches; the venv and outputs/ (runs, MLflow store)
# stay: `rm -rf .venv` for a full reinstall.
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
