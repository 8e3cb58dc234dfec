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

dev:
	DAGSTER_HOME=$${DAGSTER_HOME:-$(OMNISAGE_HOME)/dagster} ; mkdir -p $$DAGSTER_HOME ; \
	DAGSTER_HOME=$$DAGSTER_HOME dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000
