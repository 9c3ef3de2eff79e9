# One-command set-up: `make demo` then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export PIPELINE_STORE ?= $(CURDIR)/.pipeline-data

.PHONY: venv model-env demo test lint bench ui production-instance production clean-venv pipeline-auto pipeline-status pipeline-promote pipeline-resume pipeline-clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# PolicyEngine-US's own virtualenv (it needs pandas >= 3, this venv pandas < 3), built once per lock and
# interpreter under $$PIPELINE_MODEL_ENVS or ~/.cache/usdata-pipeline/model-envs; instant once built.
model-env: $(STAMP)
	$(PY) -m resources.model_environment build

demo: $(STAMP) model-env
	$(VENV)/bin/usdata-pipeline run

# Two workers (this VM's two cores, which the suite keeps busy), each taking whole test files (their
# module fixtures stay in one process).
TEST_WORKERS ?= 2
# The tests' stores and Dagster homes (several GB in all) go to tmpfs where the machine has the memory
# for them (16 GB available), as SQLite's commits there cost no disk flush; removed when the tests
# pass, kept for a look when one fails (the next `make test` clears them). TEST_TMP= keeps pytest's own.
TEST_TMP ?= $(shell awk '/^MemAvailable/ { if ($$2 > 16000000) print "/dev/shm/usdata-pipeline-tests" }' /proc/meminfo 2>/dev/null)
test: $(STAMP) model-env lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(if $(TEST_TMP),--basetemp=$(TEST_TMP))
	$(if $(TEST_TMP),rm -rf $(TEST_TMP))

# ruff (pyflakes, pycodestyle, import order) and the layer contracts in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	$(PY) -m bench.run

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The production instance (PostgreSQL, the run queue, dagster-daemon), in a home of its own: `make ui`
# and `usdata-pipeline` keep ./.dagster's embedded SQLite unless DAGSTER_HOME names this one.
# The password is never written: export DAGSTER_PG_PASSWORD wherever the instance is opened.
PRODUCTION_HOME ?= $(CURDIR)/.dagster-production
PG_HOST ?= 127.0.0.1
PG_PORT ?= 5432
PG_DB ?= dagster
PG_USER ?= dagster
MAX_RUNS ?= 4
RELEASE_RUNS ?= 1

production-instance: $(STAMP)  ## write $(PRODUCTION_HOME)/dagster.yaml for PG_HOST (a host, or a Unix socket's directory)
	$(PY) -m pipeline_assets.production_instance --home $(PRODUCTION_HOME) --hostname $(PG_HOST) --port $(PG_PORT) \
		--db-name $(PG_DB) --username $(PG_USER) --max-concurrent-runs $(MAX_RUNS) --release-runs $(RELEASE_RUNS)

production: $(STAMP)  ## dagster-daemon (the queue, the sensors) and the webserver on 127.0.0.1:3000, over the production instance
	test -f $(PRODUCTION_HOME)/dagster.yaml || { echo "no $(PRODUCTION_HOME)/dagster.yaml: run make production-instance first" >&2; exit 2; }
	export DAGSTER_HOME=$(PRODUCTION_HOME); \
	$(VENV)/bin/dagster-daemon run -w workspace.yaml & daemon=$$!; \
	trap 'kill $$daemon; wait $$daemon' EXIT INT TERM; \
	$(VENV)/bin/dagster-webserver -w workspace.yaml -h 127.0.0.1 -p 3000

# Operators' targets, in the words of the pipeline this replaces.
BRANCH ?= main
EPOCHS ?=
BUILD_DB ?= true
SCALE ?= small
GPU ?=

pipeline-auto: $(STAMP)  ## one whole run pinned to BRANCH's tip (GPU= fits on that GPU type: Modal's, or a local one)
	PIPELINE_MODAL_GPU=$(GPU) $(VENV)/bin/usdata-pipeline run --branch $(BRANCH) --scale $(SCALE) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(GPU),--fit-device cuda) $(if $(filter false no 0,$(BUILD_DB)),--reuse-database,--build-database)

pipeline-status: $(STAMP)
	$(VENV)/bin/usdata-pipeline status $(RUN_ID)

pipeline-promote: $(STAMP)
	$(VENV)/bin/usdata-pipeline promote $(RUN_ID) --version $(VERSION)

pipeline-resume: $(STAMP)
	$(VENV)/bin/usdata-pipeline resume $(RUN_ID)

pipeline-clean: $(STAMP)
	$(VENV)/bin/usdata-pipeline clean --keep $(KEEP)

clean-venv:
	rm -rf $(VENV)
