"""Helpers shared by the test files."""

import torch


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an exited child that its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights ~ 1 + 0.1 N(0,1), everything else ~ 0.1 N(0,1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_scale = param.dim() == 1 and name.endswith("weight")
            param.copy_(1 + noise if is_norm_scale else noise)


class FailingScorer:
    """An open scorer whose service is down: score() raises (--open-scorer tests.helpers:FailingScorer)."""

    relative = False

    def score(self, answer: str, sample: dict) -> float:
        raise ConnectionError("the reward model at http://localhost:8000 refused the connection")
