# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: serve test install install-test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Where no NVIDIA GPU exists, install the CPU build of torch first so that the
# `torch>=2.10` requirement is already met and no multi-GB CUDA build is pulled.
$(VENV)/.torch: | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q "torch>=2.10"; \
	else \
		$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.10"; \
	fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/aioffload serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: install-test
	$(BIN)/ruff check aioffload tests load_tests scripts
	$(BIN)/python -m pytest -q -x --durations=15

lint: install-test
	$(BIN)/ruff check aioffload tests load_tests scripts

clean:
	rm -rf $(VENV)

# Locust load test (load_tests/README.md): LOAD_ARGS go to load_tests/run.sh, e.g.
#   make load LOAD_ARGS="-u 32 -r 8 -t 5m --max-p99-ttft-ms 2000 --min-output-tps 50"
LOAD_ARGS ?=
.PHONY: load
load: install-test
	PYTHON=$(BIN)/python load_tests/run.sh $(LOAD_ARGS)

# The dashboard's browser tests drive Debian's Chromium through Playwright (which must never
# download a browser of its own); install the package where it is missing.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
install-test: $(CHROMIUM)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium
