# The project's own environment: an active virtual environment's Python, else a project `.venv` made from
# python3.11 (never a user's global interpreter). `.ci/run` goes through these targets, so it takes the same
# path. Installs are pinned by constraints.txt (exact versions): `make lock` re-resolves it on purpose.
SYSTEM_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
ifdef VIRTUAL_ENV
PYTHON ?= python
else
PYTHON ?= $(CURDIR)/.venv/bin/python
VENV := $(CURDIR)/.venv
endif
export PATH := $(if $(VENV),$(VENV)/bin:,)$(PATH)
export OMNISAGE_HOME ?= $(CURDIR)/.omnisage
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install test test-fast demo dev lint lock

install: $(VENV)
	$(PIP) -c constraints.txt torch==2.13.0
	$(PIP) -c constraints.txt -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q --durations=15 tests

# The quick loop: unit tests only. Leaves out `system` (tests/system/: kills, concurrency, the UI, end to end)
# and `slow` tests; `make test` (CI) still runs everything.
test-fast: install
	$(PYTHON) -m pytest -q --durations=15 -m "not slow and not system" tests

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

demo: install
	omnisage demo --days 3 --scale small

# The UI on 127.0.0.1 only; DAGSTER_HOME defaults to $(OMNISAGE_HOME)/dagster, created with one run at a time
# and telemetry off (omnisage_pipeline.settings.DEFAULT_DAGSTER_YAML).
dev:
	$(PYTHON) -m omnisage_pipeline.cli dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Re-resolve every dependency to its newest allowed release in a scratch environment, run nothing: review the
# diff of constraints.txt, then `make test` before committing it (docs/operations.md, "Upgrading").
lock:
	rm -rf $(CURDIR)/.lock-venv && $(SYSTEM_PYTHON) -m venv $(CURDIR)/.lock-venv
	$(CURDIR)/.lock-venv/bin/python -m pip install --quiet torch==2.13.0
	$(CURDIR)/.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '1,2p' constraints.txt; $(CURDIR)/.lock-venv/bin/python -m pip freeze --exclude-editable \
	  | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(CURDIR)/.lock-venv

$(CURDIR)/.venv:
	$(SYSTEM_PYTHON) -m venv $(CURDIR)/.venv
	$(CURDIR)/.venv/bin/python -m pip install --quiet --upgrade pip
