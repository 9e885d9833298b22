"""The building blocks the vision tower (vision.py) and the language model (model.py) share.

RMSNorm, the activations Qwen's configs name, the SwiGLU MLP, and the rotary-embedding helpers (the angles
themselves differ: 2-D rows/columns in the vision tower, 3-D MRoPE sections in the decoder).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype (as Qwen does); one fused kernel for x * rsqrt(mean x^2).
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),  # Qwen3-VL's vision tower
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)): the Qwen2 decoder MLP (no bias) and the Qwen2.5 vision MLP (bias)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def inverse_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(dim/2,) rotary frequencies theta^(-2i/dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
