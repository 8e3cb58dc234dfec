PYTHON ?= python
export OMNISAGE_HOME ?= $(CURDIR)/.omnisage

.PHONY: install test demo dev lint

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q --durations=15 tests

lint:
	$(PYTHON) -m ruff check .

demo: install
	omnisage demo --days 3 --scale small

# The UI on 127.0.0.1 only; DAGSTER_HOME defaults to $(OMNISAGE_HOME)/dagster, created with one run at a time
# and telemetry off (omnisage_pipeline.settings.DEFAULT_DAGSTER_YAML).
dev:
	$(PYTHON) -m omnisage_pipeline.cli dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000
