# The README's two commands: `make run` and `make test`. Everything else here serves them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := default-libmysqlclient-dev pkg-config build-essential chromium chromium-driver redis-sentinel

.PHONY: run test venv venv-test system-deps services lint bench clean

run: venv ## start everything on this machine (embedded Redis + SQLite unless configured)
	$(BIN)/rekku up

# The suite waits on processes, brokers and timers more than it computes: three pytest-xdist workers
# finish it in about 7.5 minutes on 2 cores (about 800 tests). Whole test files go to a worker, and
# the files that share a stack to the same one (tests/conftest.py, pytest_xdist_make_scheduler).
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 3

test: venv-test services ## install what the tests need, start Redis and MariaDB, run the suite
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(VENV)/.base-installed
$(VENV)/.base-installed: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

venv-test: system-deps $(VENV)/.test-installed
$(VENV)/.test-installed: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install -q -e '.[mariadb,selenium,reddit,signing,test,dev]'
	touch $@ $(VENV)/.base-installed

system-deps: ## Debian packages: MariaDB client headers (mysqlclient), Chromium + chromedriver, redis-sentinel (tests/test_sentinel.py)
	@if pkg-config --exists mysqlclient 2>/dev/null && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] \
			&& [ -x /usr/bin/redis-sentinel ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else \
		echo "Please install: sudo apt-get install $(APT_PACKAGES)"; exit 1; \
	fi

services: ## start Redis (127.0.0.1:6379, nothing on disk) and MariaDB (127.0.0.1:3306) if they are not running
	@bash scripts/services.sh

lint:
	$(BIN)/ruff check .

bench: venv-test services ## the benchmarks: ratios against bare Celery, measured in the same run
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .rekku .pytest_cache .hypothesis
