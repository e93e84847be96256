# One virtual environment, made on first use; every target works from a clean clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo run test check lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## demo: the whole product on embedded defaults (SQLite, a local OpenBao dev server, demo tenants);
## it writes var/demo/env for a second shell (`source var/demo/env`). PORT=8001 for another port.
PORT ?= 8000
demo: $(BIN)/.installed
	DEBUG=true $(BIN)/python manage.py demo --port $(PORT)

run: demo

## test: the test suite on the real services (PostgreSQL, MariaDB, OpenBao, Redis)
test: $(BIN)/.installed
	$(BIN)/pytest

## lint: ruff, as CI runs it
lint: $(BIN)/.installed
	$(BIN)/ruff check .

## check: lint and tests, the same way CI does
check: lint test

## bench: the fleet benchmark in the production configuration (PostgreSQL control plane, Redis
## broker), then in the default one (SQLite, ORM broker) as a second row (see bench/README.md)
bench: $(BIN)/.installed
	$(BIN)/python bench/fleet.py --control-db postgres --broker redis
	$(BIN)/python bench/fleet.py

## clean: drop the demo's databases and roles on the local servers, then every local file
clean:
	-[ -x $(BIN)/python ] && DEBUG=true $(BIN)/python manage.py demo --clean
	rm -rf $(VENV) var .pytest_cache .ruff_cache
