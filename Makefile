# Set-up and entry points. `make demo` and `make test` each create the virtual environment
# on first use (and again when pyproject.toml, setup.py or the C kernel change), so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml setup.py retrieval/index/_skinny.c retrieval/index/_skinny_kernel.h retrieval/index/_skinny_workers.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/retrieval demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
