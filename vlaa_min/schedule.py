"""Learning-rate schedule shared by SFT and GRPO: linear warmup, then cosine decay to a floor.

The paper's best GRPO setting ("LR2") is warmup over 3% of the steps and a minimum LR of 5e-7 (OpenRLHF's
cosine_with_min_lr, whose floor is 0.1 x peak), so lr(step) for peak P and floor m:
    step < W:   P * (step + 1) / W
    otherwise:  m + (P - m) * 0.5 * (1 + cos(pi * (step - W) / max(1, S - W)))
"""

import math

import torch


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """A LambdaLR over the optimizer's lr (the peak); state_dict()/load_state_dict() resume it exactly."""
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, total_steps, warmup_steps, 1.0, min_lr_ratio)
    )
