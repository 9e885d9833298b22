"""Helpers shared by the test files."""

import torch


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights ~ 1 + 0.1 N(0,1), everything else ~ 0.1 N(0,1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_scale = param.dim() == 1 and name.endswith("weight")
            param.copy_(1 + noise if is_norm_scale else noise)
