# podnet: `make run` starts the exporter on this host, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-test run test test-unit test-kernel test-fresh image image-test lint bench lock clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

run: setup
	$(PY) -m exporter run $(ARGS)

test: setup-test lint
	$(PY) -m pytest tests --ignore=tests/image $(ARGS)

test-unit: setup-test
	$(PY) -m pytest tests/unit $(ARGS)

test-kernel: setup-test
	$(PY) -m pytest tests/kernel $(ARGS)

# A clean Debian 12 root, the README's set-up and the kernel tests in it (tests/fresh/run.sh).
test-fresh:
	tests/fresh/run.sh

# The container image, built here with podman on a locally made Debian 12 base (no registry).
image:
	scripts/image.sh build

# Build the image, then run it under podman as the chart runs it and count known bytes exactly.
image-test: setup-test
	$(PY) -m pytest tests/image $(ARGS)

lint: setup-test
	$(VENV)/bin/ruff check exporter tests bench
	$(VENV)/bin/ruff format --check exporter tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/unit/test_layers.py

bench: setup-test
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v gcc >/dev/null && \
		command -v h2load >/dev/null && command -v openssl >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk gcc nghttp2-client openssl >/dev/null
	$(PY) bench/tcp_overhead.py --pairs 41 --seconds 1
	$(PY) bench/tcp_overhead.py --skip-pingpong --wrk 1,2 --pairs 41 --seconds 1 --skip-costs
	$(PY) bench/tcp_overhead.py --skip-pingpong --pin --wrk 1,8 --pairs 41 --seconds 1 --skip-costs
	$(PY) bench/event_cost.py
	$(PY) bench/h2_cost.py
	$(PY) bench/tls_cost.py
	$(PY) bench/scale.py

# Regenerate requirements.lock (runtime: make setup, the image) and requirements-test.lock (runtime +
# test: make setup-test, CI) from pyproject.toml: exact pins with hashes for CPython 3.11, from PyPI
# only (this machine's pip config is ignored), by pip-tools in a throwaway venv. Existing pins are
# kept unless UPGRADE=1; the runtime lock is seeded from the test lock so the two always agree.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 CUSTOM_COMPILE_COMMAND="make lock"; \
	unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_HASHES; \
	/usr/bin/python3 -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q -U pip 'pip-tools>=7.4'; \
	compile="$$tmp/venv/bin/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links"; \
	$$compile $(if $(UPGRADE),--upgrade) --extra test -o requirements-test.lock pyproject.toml; \
	cp requirements-test.lock requirements.lock; \
	$$compile -o requirements.lock pyproject.toml; \
	echo "lock: requirements.lock, requirements-test.lock"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
