"""The LR schedule's shape: linear warmup, cosine decay to the floor."""

import math

import pytest
import torch

from vlaa_min.schedule import cosine_with_warmup, lr_at


def test_cosine_schedule_shape():
    peak, floor, total, warmup = 1.0, 0.1, 100, 3
    assert lr_at(0, total, warmup, peak, floor) == pytest.approx(1 / 3)
    assert lr_at(warmup, total, warmup, peak, floor) == pytest.approx(peak)
    assert lr_at(total, total, warmup, peak, floor) == pytest.approx(floor)
    middle = warmup + (total - warmup) / 2
    assert lr_at(int(middle), total, warmup, peak, floor) == pytest.approx(
        floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (int(middle) - warmup) / (total - warmup))))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = cosine_with_warmup(opt, total_steps=total, warmup_ratio=0.03, min_lr_ratio=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 / 3)
    for _ in range(total):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
