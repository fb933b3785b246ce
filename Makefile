# The two commands a new user runs: `make demo` and `make test`. Both create .venv and install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rigface-installed
# torch is pinned here only: 2.13.0 is the CPU build this kind of machine carries; every other range admits it.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/no-deps.txt Makefile
	@echo "== creating $(VENV) and installing rigface[all] (first time: a few minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/pip install -q --no-deps -r requirements/no-deps.txt
	@# mediapipe asks for the GUI OpenCV build; keep exactly one cv2: the headless build.
	$(BIN)/pip uninstall -q -y opencv-contrib-python opencv-python >/dev/null 2>&1 || true
	$(BIN)/pip install -q --force-reinstall --no-deps "opencv-python-headless>=4.9"
	$(BIN)/python -c "import torch, cv2, mediapipe, diffusers, ray; assert torch.__version__.startswith('2.'), torch.__version__; print('installed: torch', torch.__version__, '| cv2', cv2.__version__, '| ray', ray.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/python -m pipelines.demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

bench: install
	for f in bench/[!_]*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

stack-up: install
	$(BIN)/rigface stack up

stack-down: install
	$(BIN)/rigface stack down

clean:
	-$(BIN)/rigface stack down 2>/dev/null
	rm -rf $(VENV) .pytest_cache build *.egg-info
