"""The GRPO loss against hand-computed cases, and its reduction to REINFORCE with a group baseline."""

import math

import pytest
import torch

from vlaa_min.grpo_loss import (
    AdaptiveKLController,
    EQUAL_REWARD_TOL,
    aggregate_tokens,
    equal_reward_groups,
    group_advantages,
    kl_per_token,
    loss_normaliser,
    policy_loss,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    # group 1: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3)
    std = math.sqrt(1.0 / 3.0)
    expected = torch.tensor([[0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(rewards), expected, atol=1e-6)
    # Dr. GRPO: mean-only
    assert torch.allclose(group_advantages(rewards, scale_by_std=False), rewards - rewards.mean(1, keepdim=True))


def test_advantages_see_only_differences_within_a_group():
    """docs/rewards.md: r -> a r + c (a > 0, per group) leaves the std-scaled advantages unchanged, so a constant
    for wrong answers of a 0/1 reward does nothing; Dr. GRPO's mean-only advantage cancels c but scales by a."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 8, generator=gen, dtype=torch.float64)
    shift = 3 * torch.rand(6, 1, generator=gen, dtype=torch.float64)  # a different constant per group
    scale = 0.5 + 4 * torch.rand(6, 1, generator=gen, dtype=torch.float64)
    grpo, dr = group_advantages(rewards), group_advantages(rewards, scale_by_std=False)
    assert torch.allclose(group_advantages(rewards + shift), grpo)
    assert torch.allclose(group_advantages(scale * rewards + shift), grpo)
    assert torch.allclose(group_advantages(rewards + shift, scale_by_std=False), dr)
    assert torch.allclose(group_advantages(scale * rewards, scale_by_std=False), scale * dr)
    assert not torch.allclose(scale * dr, dr)

    right = rewards > 0.5  # a 0/1 reward; some groups mixed, so their advantages are not all 0
    assert (right.any(1) & ~right.all(1)).any()
    binary, bonus = right.double(), 0.3
    credited = torch.where(right, 1.0, bonus).double()  # = bonus + (1 - bonus) * binary
    assert torch.allclose(group_advantages(credited), group_advantages(binary))
    assert torch.allclose(group_advantages(credited, scale_by_std=False),
                          (1 - bonus) * group_advantages(binary, scale_by_std=False))
    # What GRPO does see: a bonus that only some wrong answers get (a well-formed wrong answer vs a format failure).
    well_formed = torch.rand(6, 8, generator=gen) > 0.5
    graded = binary + bonus * (~right & well_formed)
    assert not torch.allclose(group_advantages(graded), group_advantages(binary))


@pytest.mark.parametrize("value", [1 - math.exp(-2.0), 0.1, 1 / 3, 0.7, math.pi / 10])
def test_equal_rewards_give_exactly_zero_advantage(value):
    # In float32 the mean of eight copies of a non-representable value can land one rounding step off them, and
    # (r - mean) / (std + 1e-9) then turns that noise into advantages of tens. Equal rewards must carry no signal.
    rewards = torch.full((32, 8), value, dtype=torch.float32)
    rewards[0] = torch.tensor([0.0, 1.0] * 4)  # one real group beside them
    naive = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-9)
    advantages = group_advantages(rewards)
    assert advantages.dtype == torch.float32
    assert (advantages[1:] == 0).all() and (group_advantages(rewards, scale_by_std=False)[1:] == 0).all()
    assert torch.allclose(advantages[0], naive[0])
    assert equal_reward_groups(rewards).tolist() == [False] + [True] * 31


def test_near_ties_above_the_tolerance_keep_their_advantages():
    gap = 10 * EQUAL_REWARD_TOL
    rewards = torch.tensor([[0.5] * 7 + [0.5 + gap]], dtype=torch.float64)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-9)
    assert not equal_reward_groups(rewards).any()
    assert torch.allclose(group_advantages(rewards), expected)
    assert group_advantages(rewards)[0, -1] > 2  # a lone winner's advantage: (G - 1) / sqrt(G) = 2.47 for G = 8
    within = torch.tensor([[0.5] * 7 + [0.5 + EQUAL_REWARD_TOL / 2]])
    assert (group_advantages(within) == 0).all()


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    x = ref - logp  # log(pi_ref / pi)
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.exp(x) - x - 1)
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def _single_token_loss(ratio: float, advantage: float, clip_low=0.2, clip_high=0.28) -> float:
    logp = torch.tensor([[math.log(ratio)]])
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = policy_loss(logp, old, torch.tensor([advantage]), mask, clip_low=clip_low, clip_high=clip_high,
                          aggregation="token-mean", normaliser=1.0)
    return loss.item()


@pytest.mark.parametrize(
    "ratio, advantage, expected",
    [
        (1.5, 1.0, -1.28),  # positive advantage: capped at 1 + eps_high
        (1.1, 1.0, -1.1),  # inside the region: unclipped
        (0.5, 1.0, -0.5),  # positive advantage, ratio fell: the pessimistic (unclipped) term wins
        (0.5, -1.0, 0.8),  # negative advantage: capped at 1 - eps_low
        (1.5, -1.0, 1.5),  # negative advantage, ratio rose: unclipped, keeps pushing down
    ],
)
def test_clipping_at_both_edges(ratio, advantage, expected):
    assert _single_token_loss(ratio, advantage) == pytest.approx(expected, rel=1e-5)


def test_clip_fractions_count_active_clips():
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 0.5]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, stats = policy_loss(logp, torch.zeros(1, 4), torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2,
                           aggregation="token-mean", normaliser=4.0)
    assert stats["clip_high"].item() == 1 and stats["clip_low"].item() == 0  # low clip needs A < 0
    _, stats = policy_loss(logp, torch.zeros(1, 4), torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.2,
                           aggregation="token-mean", normaliser=4.0)
    assert stats["clip_high"].item() == 0 and stats["clip_low"].item() == 2


def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    lengths = torch.tensor([3, 1])
    mask = torch.arange(3)[None, :] < lengths[:, None]
    # per-sequence means 2 and 4 -> 3; token mean 10/4; Dr.GRPO 10/(2*5) with max length 5
    cases = {"seq-mean-token-mean": 3.0, "token-mean": 2.5, "seq-mean-token-sum-norm": 1.0}
    for aggregation, expected in cases.items():
        normaliser = loss_normaliser(aggregation, lengths, max_completion_length=5)
        assert aggregate_tokens(values, mask, aggregation, normaliser).item() == pytest.approx(expected)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_the_full_batch_loss(aggregation):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=gen)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    normaliser = loss_normaliser(aggregation, lengths, max_completion_length=5)
    full = aggregate_tokens(values, mask, aggregation, normaliser)
    parts = sum(aggregate_tokens(values[i : i + 2], mask[i : i + 2], aggregation, normaliser) for i in (0, 2, 4))
    assert torch.allclose(full, parts, atol=1e-6)


def test_beta_zero_ignores_reference_and_beta_adds_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    old = logp.clone()
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([0.7])
    base, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, aggregation="token-mean",
                              normaliser=2.0)
    assert "kl" not in stats
    assert base.item() == pytest.approx(-0.7)  # ratio 1 -> -A per token
    with_kl, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, aggregation="token-mean",
                                 normaliser=2.0, beta=0.1, ref_logp=ref, kl_estimator="k1")
    assert with_kl.item() == pytest.approx(-0.7 + 0.1 * (0.5 - 1.0) / 2)
    assert stats["kl"].item() == pytest.approx(-0.5)


def _toy_policy_logps(weights, tokens):
    """A state-less softmax policy: logp of each token, (N, T)."""
    return torch.log_softmax(weights, dim=-1)[tokens]


def test_reduces_to_reinforce_with_group_baseline():
    """beta = 0, no clipping, mean-only advantages, first inner step: the gradient is REINFORCE's."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 5, (4, 6), generator=gen)
    lengths = torch.tensor([6, 2, 4, 5])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    weights = torch.randn(5, generator=gen, requires_grad=True)

    logp = _toy_policy_logps(weights, tokens)
    advantages = group_advantages(rewards, scale_by_std=False).flatten()
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, clip_low=1e9, clip_high=1e9,
                          aggregation="seq-mean-token-mean", normaliser=4.0)
    (grad_grpo,) = torch.autograd.grad(loss, weights)

    logp = _toy_policy_logps(weights, tokens)
    baseline = rewards.mean()
    reinforce = -(((rewards.flatten() - baseline) * (logp * mask).sum(1) / lengths).mean())
    (grad_reinforce,) = torch.autograd.grad(reinforce, weights)
    assert torch.allclose(grad_grpo, grad_reinforce, atol=1e-6)


def test_second_inner_iteration_uses_old_logps():
    """mu > 1: after an update the ratio moves away from 1 and the clipped objective uses pi_old, not pi."""
    weights = torch.zeros(3, requires_grad=True)
    tokens = torch.tensor([[0, 0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([1.0])
    old = _toy_policy_logps(weights, tokens).detach()
    optimizer = torch.optim.SGD([weights], lr=5.0)
    ratios = []
    for _ in range(3):  # mu = 3 inner iterations over one rollout
        logp = _toy_policy_logps(weights, tokens)
        ratios.append(torch.exp(logp - old)[0, 0].item())
        loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, aggregation="token-mean",
                                  normaliser=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ratios[0] == pytest.approx(1.0)
    assert ratios[1] > 1.2  # the big step overshot the region...
    assert stats["clip_high"].item() == 2 and weights.grad.abs().sum() == 0  # ...so the clip stops the gradient


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(init_beta=1e-3, target=5e-4, horizon=10000)
    ctl.update(current_kl=1e-2, n_samples=256)  # far above target: error clipped at +0.2
    assert ctl.value == pytest.approx(1e-3 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=0.0, n_samples=256)  # below target: error -1 clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10000))
    restored = AdaptiveKLController(0.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value and restored.target == 5e-4
