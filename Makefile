# Two entry points, each sets itself up on a fresh machine:
#   make demo   - create .venv, install quantdag, run the whole quantize flow on the embedded demo
#   make test   - create .venv, install quantdag + test extras, run the test suite (real servers)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the pair the Qwen3.5 processor needs (torchvision for its video processor)
TORCH := torch==2.14.1 torchvision==0.29.1
# headless Chromium and its WebDriver, Debian's packages, for tests/service/test_browser.py
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test setup smollm2 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(BROWSER):
	@if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver >/dev/null \
	  || echo "warning: could not install chromium and chromium-driver; the browser test will be skipped"; \
	else echo "warning: no apt-get: install Chromium and chromedriver for tests/service/test_browser.py"; fi

setup: $(VENV)/.installed

demo: setup
	$(BIN)/quantdag demo

smollm2: setup
	$(BIN)/quantdag fetch-smollm2
	$(BIN)/quantdag run smollm2-nvfp4

test: setup $(BROWSER)
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache
