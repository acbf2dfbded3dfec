# podnet: `make run` starts the exporter on this host, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-test run test test-unit test-kernel test-fresh lint bench clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

run: setup
	$(PY) -m exporter run $(ARGS)

test: setup-test lint
	$(PY) -m pytest tests $(ARGS)

test-unit: setup-test
	$(PY) -m pytest tests/unit $(ARGS)

test-kernel: setup-test
	$(PY) -m pytest tests/kernel $(ARGS)

# A clean Debian 12 root, the README's set-up and the kernel tests in it (tests/fresh/run.sh).
test-fresh:
	tests/fresh/run.sh

lint: setup-test
	$(VENV)/bin/ruff check exporter tests bench
	$(VENV)/bin/ruff format --check exporter tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/unit/test_layers.py

bench: setup-test
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v gcc >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk gcc >/dev/null
	$(PY) bench/tcp_overhead.py --pairs 41 --seconds 1
	$(PY) bench/tcp_overhead.py --skip-pingpong --wrk 1,2 --pairs 41 --seconds 1 --skip-costs
	$(PY) bench/tcp_overhead.py --skip-pingpong --pin --wrk 1,8 --pairs 41 --seconds 1 --skip-costs
	$(PY) bench/event_cost.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
