"""Training checkpoints that resume exactly, written atomically.

A checkpoint is a directory that is at once a Hugging Face model directory (config.json, safetensors, tokenizer,
preprocessor_config.json -- load it with transformers or with our VLModel.from_pretrained; with LoRA a PEFT adapter
directory instead of config.json + safetensors, vlaa_min/lora.py) and a resumable training
state (trainer_state.pt: step, optimizer, scheduler, data sampler, every RNG, and whatever else the trainer passes,
e.g. the KL controller). It is written into a temporary directory and renamed into place, so a crash mid-save
leaves the previous checkpoints intact and never a half-written one. The final model directory is written the same
way (save_model). On resume, a newest checkpoint that does not load (a truncated file, an empty folder) is
reported, deleted, and the one before it is used (load_newest).

Under torchrun the weights and the optimizer state are gathered whole (vlaa_min.infra.distributed) and rank 0 writes
the same directory; what differs per rank (RNG states, the trainer's `per_rank` entries) is kept for every rank,
and a checkpoint resumes only under the number of ranks that wrote it.

    out/checkpoints/step_000050/   out/checkpoints/step_000100/   ...
"""

import os
import random
import re
import shutil

import numpy as np
import torch

from vlaa_min import lora
from vlaa_min.infra import distributed
from vlaa_min.infra.checkpoint import atomic_directory
from vlaa_min.infra.cli import UserError
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


def checkpoint_steps(out_dir: str) -> list[int]:
    """The steps of out_dir's checkpoints, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))


def latest_checkpoint(out_dir: str) -> str | None:
    steps = checkpoint_steps(out_dir)
    return checkpoint_dir(out_dir, steps[-1]) if steps else None


def save_model(directory: str, model, processor, state: dict | None = None) -> None:
    """Weights, config, tokenizer, processor (and a trainer state) as one unit: all of them or the old directory.

    A model with LoRA adapters writes only them, in PEFT's format (vlaa_min/lora.py). Under torchrun every rank
    calls it (the weights are gathered) and rank 0 writes.
    """
    weights = distributed.model_state(model)
    if distributed.is_main():
        with atomic_directory(directory) as tmp:
            if lora.lora_layers(model):
                lora.save_adapter(tmp, model, state_dict=weights)
            else:
                model.save_pretrained(tmp, state_dict=weights)
            processor.save_pretrained(tmp)
            if state is not None:
                torch.save(state, os.path.join(tmp, STATE_FILE))
    distributed.barrier()


def save_checkpoint(out_dir: str, step: int, model, processor, state: dict, keep_last: int = 2,
                    per_rank: dict | None = None) -> str:
    """Write model + processor + {"step", **state, "rng", **per_rank} atomically; keep the newest `keep_last`.

    `per_rank`: entries that differ between ranks (e.g. a sampling generator); under torchrun every rank's copy
    is kept, in "ranks", with the world size.
    """
    final = checkpoint_dir(out_dir, step)
    ranks = distributed.all_gather_objects({"rng": rng_state(), **(per_rank or {})})
    state = {"step": step, **ranks[0], **state}
    if distributed.is_distributed():
        state |= {"world_size": distributed.world_size(), "ranks": ranks}
    save_model(final, model, processor, state)
    if distributed.is_main():
        for old_step in checkpoint_steps(out_dir)[:-keep_last]:
            shutil.rmtree(checkpoint_dir(out_dir, old_step), ignore_errors=True)
    return final


def load_state(checkpoint: str) -> dict:
    """The trainer_state.pt of a checkpoint (RNG state not yet applied: call set_rng_state(state["rng"]) last)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{checkpoint} has no {STATE_FILE}: it is a model directory, not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_newest(out_dir: str) -> tuple[str, dict, dict] | None:
    """(path, trainer state, weights) of the newest checkpoint that loads, or None when there is none.

    A newer one that does not load is reported and deleted: it holds nothing usable, and the resumed run writes
    its step again.
    """
    broken = []
    for step in reversed(checkpoint_steps(out_dir)):
        path = checkpoint_dir(out_dir, step)
        try:
            state = load_state(path)
            weights = (lora.read_adapter(path)[1] if lora.is_adapter(path)
                       else VLModel.from_pretrained(path).state_dict())
        except Exception as error:  # any failure to load makes the checkpoint unusable; say which and why
            print(f"skipping checkpoint {path}: it does not load ({type(error).__name__}: {error})")
            broken.append(path)
            continue
        for dead in broken:
            shutil.rmtree(dead)
        return path, state, weights
    if broken:
        raise UserError(f"no checkpoint in {os.path.join(out_dir, 'checkpoints')} loads; nothing to resume (the "
                        f"reasons are printed above); start again with --overwrite true")
    return None


def resume_training(checkpoint: str, state: dict, weights: dict, model, optimizer, scheduler, sampler) -> dict:
    """Restore weights, optimizer, scheduler, data sampler and every RNG from a loaded checkpoint, in place.

    Returns the whole saved state, so that a trainer can restore what else it saved (KL controller, ...); under
    torchrun with this rank's own `per_rank` entries and RNG.
    """
    saved_world, world = state.get("world_size", 1), distributed.world_size()
    if saved_world != world:
        raise UserError(f"{checkpoint} was written by {saved_world} process(es); resume it with the same number "
                        f"(NPROC={saved_world}), not {world}")
    if world > 1:
        state = state | state["ranks"][distributed.rank()]
    own = model.state_dict()  # each tensor back in its own dtype (a LoRA base may be bf16, its adapters fp32)
    weights = {name: tensor.to(own[name].dtype) if name in own else tensor for name, tensor in weights.items()}
    if lora.lora_layers(model):  # an adapter checkpoint: the adapters, the frozen base stays as loaded
        if set(weights) != set(lora.adapter_state(own)):
            raise UserError(f"{checkpoint}: its adapter does not match this run's --lora-targets / --lora-rank")
        distributed.load_model_state(model, weights, strict=False)
    else:
        distributed.load_model_state(model, weights)
    distributed.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    distributed.print0(f"resumed from {checkpoint} at step {state['step']}")
    return state
