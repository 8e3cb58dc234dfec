# Which Python: an active virtual environment's; else the system `python` when it accepts pip installs; else
# (PEP 668 "externally managed" Debian/Ubuntu Pythons, or no `python` command) a project `.venv` made from
# python3.11. `.ci/run` goes through these targets, so it takes the same path.
SYSTEM_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
ifdef VIRTUAL_ENV
PYTHON ?= python
else ifeq ($(shell command -v python >/dev/null 2>&1 && python -c "import os, sysconfig; print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))" 2>/dev/null),False)
PYTHON ?= python
else
PYTHON ?= $(CURDIR)/.venv/bin/python
VENV := $(CURDIR)/.venv
endif
export PATH := $(if $(VENV),$(VENV)/bin:,)$(PATH)
export OMNISAGE_HOME ?= $(CURDIR)/.omnisage

.PHONY: install test demo dev lint

install: $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q --durations=15 tests

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

demo: install
	omnisage demo --days 3 --scale small

# The UI on 127.0.0.1 only; DAGSTER_HOME defaults to $(OMNISAGE_HOME)/dagster, created with one run at a time
# and telemetry off (omnisage_pipeline.settings.DEFAULT_DAGSTER_YAML).
dev:
	$(PYTHON) -m omnisage_pipeline.cli dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

$(CURDIR)/.venv:
	$(SYSTEM_PYTHON) -m venv $(CURDIR)/.venv
	$(CURDIR)/.venv/bin/python -m pip install --quiet --upgrade pip
