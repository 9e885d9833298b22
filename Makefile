# vlaa-min: every target installs what it needs first (a local .venv), so any of them works on a fresh clone.
# Real run: make grpo MODEL=path/to/Qwen2.5-VL-3B-Instruct DATA=path/to/VLAA-Thinking-GRPO-25K.json IMAGES=path/to/images
# On 8 GPUs: the same plus NPROC=8.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build on this machine's disk; GPU users: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# (or any torch already installed in $(VENV) is kept as it is).
TORCH_SPEC ?= torch==2.13.0

# Where the toy world and the runs live; MODEL / DATA / IMAGES switch a target to a real checkpoint and data set.
TOY    ?= toy
RUNS   ?= runs
MODEL  ?=
DATA   ?=
IMAGES ?=
TRACES ?= clean
ARGS   ?=
# NPROC=N runs `make sft` / `make grpo` as N processes (GPUs, or CPU processes without one) under torchrun, FSDP2.
NPROC  ?= 1
ifeq ($(NPROC),1)
TRAIN  := $(PY)
else
TRAIN  := $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC)
endif

# Every recipe is a named preset in vlaa_min/presets.py (toy-base, toy-sft, toy, paper); ARGS overrides any value.

.PHONY: install test test-slow rehearse data base sft grpo eval plot view experiment bench clean

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

# The real run rehearsed on the CPU: Qwen's real tokenizer, Qwen2.5-VL-3B's widths (2 layers, random weights),
# VLAA-Thinking's record layouts; make sft / grpo / eval with MODEL set, then parity with transformers (docs/rehearsal.md).
rehearse: $(STAMP)
	mkdir -p $(RUNS)
	$(PY) -m pytest -m slow -s tests/test_rehearsal.py --basetemp $(RUNS)/rehearsal

data: $(TOY)/world.json

$(TOY)/world.json: toyworld.py | $(STAMP)
	$(PY) toyworld.py --out $(TOY)

$(RUNS)/toy-init/config.json: $(TOY)/world.json vlaa_min/toy_model.py | $(STAMP)
	$(PY) -m vlaa_min.toy_model --data $(TOY) --out $(RUNS)/toy-init

base: $(RUNS)/base/model/config.json

$(RUNS)/base/model/config.json: $(RUNS)/toy-init/config.json
	$(PY) train_sft.py --model $(RUNS)/toy-init --data $(TOY)/base.json --images $(TOY)/images \
	  --out $(RUNS)/base --preset toy-base --resume true

ifeq ($(TRACES),pseudo)
SFT_DATA := $(TOY)/sft_pseudo.json
else
SFT_DATA := $(TOY)/sft.json
endif

ifneq ($(MODEL),)
sft: $(STAMP)
	$(TRAIN) train_sft.py --preset paper --model $(MODEL) --data $(DATA) --images $(IMAGES) --out $(RUNS)/sft $(ARGS)

grpo: $(STAMP)
	$(TRAIN) train_grpo.py --preset paper --model $(MODEL) --data $(DATA) --images $(IMAGES) --out $(RUNS)/grpo $(ARGS)
else
sft: $(RUNS)/base/model/config.json
	$(TRAIN) train_sft.py --model $(RUNS)/base/model --data $(SFT_DATA) --images $(TOY)/images \
	  --out $(RUNS)/sft-$(TRACES) --preset toy-sft $(ARGS)

# GRPO from the toy base (a new run each time), then the control: the base with as much more SFT on its own data.
grpo: $(RUNS)/base/model/config.json
	$(TRAIN) train_grpo.py --model $(RUNS)/base/model --data $(TOY)/rl.json --images $(TOY)/images \
	  --eval-data $(TOY)/test.json --out $(RUNS)/grpo --preset toy --overwrite true $(ARGS)
	$(PY) control.py --base $(RUNS)/base --grpo $(RUNS)/grpo --out $(RUNS)/grpo-control
endif

# Evaluate a checkpoint (default: the last GRPO run) on the toy test split, or on DATA/IMAGES.
EVAL_MODEL ?= $(if $(MODEL),$(MODEL),$(RUNS)/grpo/model)
eval: $(STAMP)
	$(PY) eval.py --model $(EVAL_MODEL) --data $(if $(DATA),$(DATA),$(TOY)/test.json) \
	  --images $(if $(IMAGES),$(IMAGES),$(TOY)/images) $(ARGS)

plot: $(STAMP)
	$(PY) -c "from vlaa_min.metrics import plot_curves; print(plot_curves({'grpo': '$(RUNS)/grpo/metrics.jsonl'}, \
	  ['reward', 'accuracy', 'completion_length', 'kl'], '$(RUNS)/grpo/curves.png', title='GRPO'))"

# One self-contained HTML page of a GRPO run's rollout log (open it in a browser): $(RUN)/rollouts.html
RUN ?= $(RUNS)/grpo
view: $(STAMP)
	$(PY) -m vlaa_min.view $(RUN)

experiment: $(RUNS)/base/model/config.json
	$(PY) experiment.py --base $(RUNS)/base/model --toy $(TOY) --out $(RUNS)/experiment $(ARGS)

bench: $(STAMP)
	$(PY) bench/generate.py

clean:
	rm -rf runs toy .pytest_cache
