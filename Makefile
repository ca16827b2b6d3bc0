# Two entry points for a fresh machine (README Quickstart): `make demo` and `make test`.
# Both create .venv on first use (torch resolves from this machine's local wheel; see README).
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) jobs/sweep.py --resume  # a second demo re-reports (or finishes) the same experiment

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q
