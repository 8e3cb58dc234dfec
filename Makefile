PYTHON ?= python
export OMNISAGE_HOME ?= $(CURDIR)/.omnisage

.PHONY: install test demo dev lint

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -q --durations=15 tests

lint:
	$(PYTHON) -m ruff check .
