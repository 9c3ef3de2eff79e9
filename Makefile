# One-command set-up: `make demo` then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export PIPELINE_STORE ?= $(CURDIR)/.pipeline-data

.PHONY: venv demo test bench ui clean-venv pipeline-auto pipeline-status pipeline-promote pipeline-resume pipeline-clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/usdata-pipeline run

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench.run

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

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
