# vlaa-min: every target installs what it needs first (a local .venv), so any of them works on a fresh clone.
# Real run: make grpo MODEL=path/to/Qwen2.5-VL-3B-Instruct DATA=path/to/VLAA-Thinking-GRPO-25K.json IMAGES=path/to/images
# On 8 GPUs: the same plus NPROC=8.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build (on the development machine it comes from the local disk); GPU users: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
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
# CONTROL=0: make grpo skips the SFT control. EVAL_SIZE: the toy held-out questions of make grpo and make eval.
CONTROL   ?= 1
EVAL_SIZE ?= 500
# NPROC=N runs `make sft` / `make grpo` as N processes (GPUs, or CPU processes without one) under torchrun, FSDP2;
# through vlaa_min.infra.launch, torchrun that adds no traceback to a worker's one-line error.
NPROC  ?= 1
ifeq ($(NPROC),1)
TRAIN  := $(PY)
else
TRAIN  := $(PY) -m vlaa_min.infra.launch --standalone --nproc_per_node $(NPROC)
endif

# Every recipe is a named preset in vlaa_min/presets.py (toy-base, toy-sft, toy, paper); ARGS overrides any value.

.PHONY: help install test test-slow rehearse data base sft grpo eval plot view experiment bench clean

# The default goal: plain `make` lists the targets (tests/test_make.py checks that every .PHONY target is here).
help:
	@echo "make TARGET [VARIABLE=value ...]; every target installs what it needs first (a local $(VENV))"
	@echo ""
	@echo "  install     the venv: torch, transformers and this package (editable)"
	@echo "  test        the default test suite (a few minutes on 2 cores)"
	@echo "  test-slow   the slow tests (pytest -m slow)"
	@echo "  rehearse    the real run rehearsed on the CPU: Qwen's tokenizer and widths (docs/rehearsal.md)"
	@echo "  data        the offline toy world in $(TOY)/"
	@echo "  base        the toy instruct base: SFT from a random init (preset toy-base)"
	@echo "  sft         SFT on the toy reasoning traces from the base (TRACES=clean|pseudo), or on MODEL/DATA"
	@echo "  grpo        GRPO from the toy base, then the SFT control on as many samples (CONTROL=0 skips it)"
	@echo "  eval        evaluate a checkpoint (default $(RUNS)/grpo/model) on $(EVAL_SIZE) toy test questions, or DATA"
	@echo "  plot        the curves of $(RUNS)/grpo as a PNG"
	@echo "  view        the rollout viewer of a GRPO run: $(RUNS)/grpo/rollouts.html (RUN=another run)"
	@echo "  experiment  the SFT-vs-RL study on the toy world: four GRPO runs, one table"
	@echo "  bench       the generation benchmark"
	@echo "  clean       delete runs/, toy/ and the pytest cache"
	@echo ""
	@echo "variables:"
	@echo "  MODEL=DIR DATA=FILE IMAGES=DIR   a real checkpoint and data set instead of the toy (sft, grpo, eval)"
	@echo "  NPROC=N       make sft / make grpo as N processes under torchrun (FSDP2)"
	@echo "  ARGS=\"...\"    flags passed on to the script, e.g. ARGS=\"--steps 5\" (python train_grpo.py --help)"
	@echo "  CONTROL=0     make grpo without the control"
	@echo "  TRACES=pseudo make sft on the hesitant traces"
	@echo "  RUN=DIR       the run make view renders (default $(RUNS)/grpo)"
	@echo "  EVAL_SIZE=N   toy held-out questions of make grpo and make eval (now $(EVAL_SIZE); 0 = all)"

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

# GRPO from the toy base (a new run each time), then the control: the base with as many more samples of SFT on its
# own data as GRPO trained on (control.py sizes it from the GRPO run's saved config, so ARGS count).
grpo: $(RUNS)/base/model/config.json
	$(TRAIN) train_grpo.py --model $(RUNS)/base/model --data $(TOY)/rl.json --images $(TOY)/images \
	  --eval-data $(TOY)/test.json --eval-size $(EVAL_SIZE) --out $(RUNS)/grpo --preset toy --overwrite true $(ARGS)
ifneq ($(CONTROL),0)
	$(PY) control.py --base $(RUNS)/base --grpo $(RUNS)/grpo --out $(RUNS)/grpo-control
endif
endif

# Evaluate a checkpoint (default: the last GRPO run) on the toy test split's first EVAL_SIZE questions (make grpo's
# held-out ones, so the numbers compare), or on all of DATA/IMAGES.
EVAL_MODEL ?= $(if $(MODEL),$(MODEL),$(RUNS)/grpo/model)
eval: $(STAMP)
	$(PY) evaluate.py --model $(EVAL_MODEL) --data $(if $(DATA),$(DATA) --open-scorer none,$(TOY)/test.json --eval-size $(EVAL_SIZE)) \
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
