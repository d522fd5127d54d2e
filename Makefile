# Set-up, tests and lint for napari-mamba-seg. `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
# torch is installed first, on its own: the default is the CPU build here; on a CUDA machine pass the
# CUDA build, e.g. make venv TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/<cuda tag>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# Xvfb screen for the GUI tests (xvfb-run's default 8-bit 640x480 screen is too small for napari)
XVFB_SCREEN ?= 1280x1024x24

VENV_PYTHON := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.napari-mamba-seg-install.stamp

.DEFAULT_GOAL := help
.PHONY: help venv test demo lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-7s %s\n", $$1, $$2}'

venv: $(VENV_STAMP)  ## create .venv (if missing) and install torch, then the project with its test extras

# Re-runs only when pyproject.toml is newer than the stamp (or the venv is gone).
$(VENV_STAMP): pyproject.toml
	@test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(VENV_PYTHON) -m pip install -e ".[test]"
	@touch $@

test: venv  ## run the whole test suite (GUI tests under xvfb-run when it exists)
	@if command -v xvfb-run >/dev/null 2>&1; then \
		echo "xvfb-run -a -s '-screen 0 $(XVFB_SCREEN)' $(VENV_PYTHON) -m pytest $(PYTEST_ARGS)"; \
		xvfb-run -a -s "-screen 0 $(XVFB_SCREEN)" $(VENV_PYTHON) -m pytest $(PYTEST_ARGS); \
	else \
		echo "xvfb-run not found: running pytest without a virtual display"; \
		$(VENV_PYTHON) -m pytest $(PYTEST_ARGS); \
	fi

demo: venv  ## open napari with the breast phantom sample and the Segment and Correct widgets
	$(VENV)/bin/napari-mamba-seg demo

lint: venv  ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove build outputs and caches (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
