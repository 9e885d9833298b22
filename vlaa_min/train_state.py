"""Training checkpoints that resume exactly, written atomically.

A checkpoint is a directory that is at once a Hugging Face model directory (config.json, safetensors, tokenizer,
preprocessor_config.json -- load it with transformers or with our VLModel.from_pretrained) and a resumable training
state (trainer_state.pt: step, optimizer, scheduler, data sampler, every RNG, and whatever else the trainer passes,
e.g. the KL controller). It is written into a temporary directory and renamed into place, so a crash mid-save
leaves the previous checkpoints intact and never a half-written one.

    out/checkpoints/step_000050/   out/checkpoints/step_000100/   ...
"""

import os
import random
import re
import shutil

import numpy as np
import torch

from vlaa_min.checkpoint import atomic_directory
from vlaa_min.model import VLModel

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:06d}")


def latest_checkpoint(out_dir: str) -> str | None:
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return checkpoint_dir(out_dir, max(steps)) if steps else None


def save_checkpoint(out_dir: str, step: int, model, processor, state: dict, keep_last: int = 2) -> str:
    """Write model + processor + {"step", **state, "rng"} atomically; keep only the newest `keep_last`."""
    final = checkpoint_dir(out_dir, step)
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        torch.save({"step": step, "rng": rng_state(), **state}, os.path.join(tmp, STATE_FILE))
    root = os.path.join(out_dir, "checkpoints")
    old = sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))[:-keep_last]
    for old_step in old:
        shutil.rmtree(checkpoint_dir(out_dir, old_step), ignore_errors=True)
    return final


def load_state(checkpoint: str) -> dict:
    """The trainer_state.pt of a checkpoint (RNG state not yet applied: call set_rng_state(state["rng"]) last)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{checkpoint} has no {STATE_FILE}: it is a model directory, not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)


def resume_training(checkpoint: str, model, optimizer, scheduler, sampler) -> dict:
    """Restore weights, optimizer, scheduler, data sampler and every RNG from `checkpoint`, in place.

    Returns the whole saved state, so that a trainer can restore what else it saved (KL controller, ...).
    """
    state = load_state(checkpoint)
    weights = VLModel.from_pretrained(checkpoint, dtype=next(model.parameters()).dtype).state_dict()
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    print(f"resumed from {checkpoint} at step {state['step']}")
    return state
