# Two commands on a fresh machine: `make run` (the service, embedded mode) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser run test lint bench-data bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/squeeze serve

# The dashboard's browser tests drive Debian's chromium (Playwright cannot download its own here).
browser:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check app worker tests bench migrations
	$(BIN)/mypy worker/compression

bench-data: $(STAMP)
	$(BIN)/python -m bench.data

clean:
	rm -rf $(VENV) .squeeze .pytest_cache
