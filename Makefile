# Every target installs what it needs into .venv first (Python >= 3.10).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The demo needs only the package itself (no test tools, no Kafka client).
DEMO_STAMP := $(VENV)/.demo-stamp

.PHONY: demo test lint bench mutations conformance clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,kafka]'
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/celery-ledger demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ledger projections migrations tests bench

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Breaks each core guarantee in one line and checks its tests fail (tests/mutations.py);
# ~14-17 minutes on a quiet 2-core machine, not run by CI. Last report: tests/mutations.txt.
mutations: $(STAMP)
	$(BIN)/python -m tests.mutations $(MUTATIONS_ARGS)

# Celery's integration suite (from the installed Celery's sdist) on ledger+postgresql,
# ledger+sqlite and the Redis backend. Narrow it with CONFORMANCE_ARGS="-k chord" (pytest
# arguments), CONFORMANCE_BACKENDS=postgresql,redis, CONFORMANCE_FILES=test_canvas.py.
# Redis databases: CONFORMANCE_BROKER for the ledger runs, 4 and 5 for the Redis run
# (python -m tests.conformance --help).
CONFORMANCE_STAMP := $(VENV)/.conformance-stamp
CONFORMANCE_BACKENDS ?= postgresql,sqlite,redis
CONFORMANCE_FILES ?= test_tasks.py,test_canvas.py
CONFORMANCE_BROKER ?= redis://127.0.0.1:6379/3

$(CONFORMANCE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,kafka,conformance]'
	touch $(CONFORMANCE_STAMP)

conformance: $(CONFORMANCE_STAMP)
	$(BIN)/python -m tests.conformance --backends '$(CONFORMANCE_BACKENDS)' \
		--files '$(CONFORMANCE_FILES)' --ledger-broker '$(CONFORMANCE_BROKER)' -- $(CONFORMANCE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
