# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

SMOKE := .venv-smoke
SMOKE_BIN := $(SMOKE)/bin
PACKAGE_FILES := $(shell find aioffload -type f -not -path '*/__pycache__/*' -not -name '*.pyc')

.PHONY: serve test install install-test lint clean smoke

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Where no NVIDIA GPU exists, install the CPU build of torch first so that the
# `torch>=2.10` requirement is already met and no multi-GB CUDA build is pulled.
# $(call install_torch,PIP): the same choice for every venv.
define install_torch
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(1) install -q "torch>=2.10"; \
	else \
		$(1) install -q torch==2.13.0 || $(1) install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.10"; \
	fi
endef

$(VENV)/.torch: | $(BIN)/python
	$(call install_torch,$(BIN)/pip)
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
	$(MAKE) --no-print-directory smoke

# Runtime-only smoke check: a second venv with `pip install .` and no extras generates and serves
# the demo model (scripts/smoke_runtime.py), so a missing runtime dependency cannot pass CI. The venv
# is rebuilt from nothing when pyproject.toml changes (a dropped dependency is really gone) and the
# package reinstalled when its files change; otherwise it is reused.
$(SMOKE)/.deps: pyproject.toml
	rm -rf $(SMOKE)
	$(PY) -m venv $(SMOKE)
	$(SMOKE_BIN)/pip install -q --upgrade pip
	$(call install_torch,$(SMOKE_BIN)/pip)
	touch $@

$(SMOKE)/.installed: $(SMOKE)/.deps $(PACKAGE_FILES)
	rm -rf build
	$(SMOKE_BIN)/pip install -q .  # no extras; a local folder is always rebuilt and reinstalled
	touch $@

smoke: $(SMOKE)/.installed
	$(SMOKE_BIN)/python scripts/smoke_runtime.py --bin $(SMOKE_BIN)

lint: install-test
	$(BIN)/ruff check aioffload tests load_tests scripts

clean:
	rm -rf $(VENV) $(SMOKE)

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
