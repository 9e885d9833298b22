"""Named recipes: the settings of each training stage, in one place.

A preset lists the fields that differ from its script's dataclass defaults. `--preset NAME` applies them, and any
other flag on the command line overrides them; the Makefile, experiment.py and the tests all start from these.

    python train_sft.py --preset toy-base --model runs/toy-init --data toy/base.json --out runs/base
    python train_grpo.py --preset paper --model Qwen2.5-VL-3B-Instruct --data VLAA-Thinking-GRPO-25K.json ...

The GRPO dataclass defaults are the toy recipe, so "toy" is empty. The paper's values (docs/paper.md; OpenRLHF defaults
where the paper is silent) are in "paper": G = 4, 512 prompts per rollout, train batch 256 (8 updates per
rollout), 49 steps (one epoch of 25,195 prompts), adaptive KL 1e-3 -> 5e-4, peak LR 5e-6 with 3% warmup, 1024
new tokens; its SFT: global batch 128, one epoch, the vision tower frozen. Not in the paper, needed by Qwen2.5-VL:
images are capped at 28*28*1280 pixels (<= 1,280 image tokens, transformers' Qwen2-VL default; the hub's own file
allows 16,384), so a prompt fits 2,048 tokens and an SFT sample (prompt + R1 trace) 4,096.
"""

QWEN_MAX_PIXELS = 28 * 28 * 1280
# The toy world's open-ended scorer: the default of the toy recipe (train_grpo.py, evaluate.py); real data uses
# token F1 (open_scorer None, the paper preset).
TOY_OPEN_SCORER = "toyworld:ToySceneScorer"

PRESETS = {
    "SFTConfig": {
        # The toy "instruct" base, from a random init: the vision tower trains too, or nothing could see.
        "toy-base": dict(steps=1500, batch_size=16, micro_batch_size=16, lr=1e-3, warmup_ratio=0.05,
                         freeze_vision=False, eval_every=250, save_every=250),
        # SFT on the toy reasoning traces, from the base (make sft, experiment.py).
        "toy-sft": dict(steps=150, batch_size=32, micro_batch_size=16, lr=1e-3, freeze_vision=False, eval_every=50),
        "paper": dict(batch_size=128, micro_batch_size=4, lr=1e-5, epochs=1.0, freeze_vision=True,
                      max_pixels=QWEN_MAX_PIXELS, max_length=4096),
    },
    "GRPOConfig": {
        "toy": {},
        "paper": dict(prompts_per_step=512, group_size=4, train_batch_size=256, micro_batch_size=8, steps=49,
                      max_new_tokens=1024, lr=5e-6, warmup_ratio=0.03, kl_init=1e-3, kl_target=5e-4,
                      eval_data=None, save_every=5, open_scorer=None, max_pixels=QWEN_MAX_PIXELS, max_prompt_length=2048),
    },
}


def presets_of(config_cls) -> dict[str, dict]:
    """The presets of a config dataclass ({} when it has none)."""
    return PRESETS.get(config_cls.__name__, {})


def make_config(config_cls, preset: str, **overrides):
    """A config from a preset, with `overrides` on top (what `--preset NAME --flag value` does)."""
    known = presets_of(config_cls)
    if preset not in known:
        raise ValueError(f"unknown preset {preset!r} for {config_cls.__name__}; known: {sorted(known)}")
    return config_cls(**{**known[preset], **overrides})
