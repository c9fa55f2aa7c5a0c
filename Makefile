# One-command set-up and the two commands of the README.
#   make demo   set-up if needed, then synthetic data -> shards -> training -> LFW evaluation
#   make test   set-up if needed, then the whole test suite
#   make test-fast  the suite without the tests marked slow (a few minutes on 2 cores)
# FLAVOR=gpu installs requirements/gpu.txt (CUDA torch + DALI) instead of the CPU stack.
PYTHON ?= python3
VENV ?= .venv
FLAVOR ?= cpu
# A package index to take torch from first, e.g. https://download.pytorch.org/whl/cpu for the small
# CPU build where pip's own configuration does not offer it (PyPI's Linux wheel is the CUDA build).
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(FLAVOR)
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo lint clean-demo

setup: $(STAMP)

$(STAMP): requirements/$(FLAVOR).txt requirements/no-deps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) torch==2.13.0)
	$(PY) -m pip install --quiet -r requirements/$(FLAVOR).txt
	$(PY) -m pip install --quiet --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	PY=$(PY) DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

clean-demo:
	rm -rf $(DEMO_DIR)
