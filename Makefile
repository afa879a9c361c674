# Two entry points, each sets itself up on a fresh machine:
#   make demo   - create .venv, install quantdag, run the whole quantize flow on the embedded demo
#   make test   - create .venv, install quantdag + test extras, run the test suite (real servers)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the pair the Qwen3.5 processor needs (torchvision for its video processor)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup smollm2 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/quantdag demo

smollm2: setup
	$(BIN)/quantdag fetch-smollm2
	$(BIN)/quantdag run smollm2-nvfp4

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache
