# Two commands on a fresh machine with Python 3.11+ and make:
#   make run    the whole system (embedded Redis and PostgreSQL unless REDIS_URL/DATABASE_URL are set)
#   make test   ruff and the test suite (it starts its own servers)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "NOVA Streams needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/nova dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Three test processes on two cores: about a third of the suite is waiting (servers restarting, workers
# killed and reclaimed, timeouts running out), which a third process fills (measured 314-334 s with two,
# 262-306 s with three, on two cores).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 3

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)

clean:
	rm -rf .nova
