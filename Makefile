# vlaa-min: every target installs what it needs first (a local .venv), so any of them works on a fresh clone.
# Real run: make grpo MODEL=path/to/Qwen2.5-VL-3B-Instruct DATA=path/to/VLAA-Thinking-GRPO-25K.json IMAGES=path/to/images

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build on this machine's disk; GPU users: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# (or any torch already installed in $(VENV) is kept as it is).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,plot]"
	$(PY) -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf runs toy .pytest_cache
