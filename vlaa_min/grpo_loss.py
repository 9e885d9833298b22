"""The GRPO objective, term by term (pure tensor functions; train_grpo.py runs the loop around them).

For a prompt q we sample a group of G completions o_1..o_G from the policy at rollout time (pi_old) and score
each with the mixed reward r_i. Then, per completion token t of o_i:

    A_i        = (r_i - mean_j r_j) / (std_j r_j + eps); 0 if all r_j are equal group_advantages (std optional)
    rho_{i,t}  = pi(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})   policy_loss: ratio
    L^clip_i,t = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)    policy_loss: pg_loss
    KL_i,t     = k1: log pi - log pi_ref;  k3: exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
    l_i,t      = L^clip_i,t + beta * KL_i,t
    loss       = aggregate(l, mask)                                           aggregate_tokens

Aggregations (mask from completion lengths, EOS included):
    "seq-mean-token-mean"  mean over sequences of the per-sequence token mean (the paper / OpenRLHF default)
    "token-mean"           sum over all tokens / number of tokens (DAPO)
    "seq-mean-token-sum-norm"  sum over all tokens / (num sequences * max completion length) (Dr. GRPO)
The normaliser is passed in for the *whole* optimizer batch, so summing the micro-batch losses gives exactly the
full-batch loss whatever the micro-batch split (gradient accumulation changes nothing).

beta follows either a fixed value or OpenRLHF's AdaptiveKLController (the paper's best "KL2": init 1e-3,
target 5e-4, horizon 10000).
"""

import torch

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


# Rewards that differ by less than this are equal: a group of them carries no signal. Float rounding of one
# reward (e.g. 1 - e^-2 summed eight times) leaves a std near 1e-8, which (r - mean) / (std + 1e-9) would
# blow up into advantages of +-60; real spreads of a [0, 1] reward are far above it.
EQUAL_REWARD_TOL = 1e-6


def equal_reward_groups(rewards: torch.Tensor, tol: float = EQUAL_REWARD_TOL) -> torch.Tensor:
    """(P, G) rewards -> (P,) bool: the groups whose rewards are all equal within tol (no signal)."""
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) <= tol


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-9) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages; a group of equal rewards (`equal_reward_groups`) gets exactly 0.

    std is the unbiased sample std over the group (as OpenRLHF and TRL); scale_by_std=False is Dr. GRPO's
    mean-only baseline. Computed in float64, returned in the rewards' dtype.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"need (prompts, G>=2) rewards, got {tuple(rewards.shape)}")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.masked_fill(equal_reward_groups(r)[:, None], 0.0).to(rewards.dtype)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1 / k3)."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        # exp(x) - x - 1 >= 0 and unbiased; clamp x so a rare huge ratio cannot overflow to inf.
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def loss_normaliser(aggregation: str, lengths: torch.Tensor, max_completion_length: int) -> float:
    """The denominator for `aggregate_tokens`, computed once over the whole optimizer batch of completions."""
    if aggregation == "seq-mean-token-mean":
        return float(lengths.numel())
    if aggregation == "token-mean":
        return float(lengths.sum().clamp(min=1))
    if aggregation == "seq-mean-token-sum-norm":
        return float(lengths.numel() * max_completion_length)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def aggregate_tokens(values: torch.Tensor, mask: torch.Tensor, aggregation: str, normaliser: float) -> torch.Tensor:
    """(N, T) per-token values, (N, T) bool mask -> this micro-batch's share of the batch loss (a scalar)."""
    masked = values * mask
    if aggregation == "seq-mean-token-mean":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        return per_sequence.sum() / normaliser
    if aggregation in ("token-mean", "seq-mean-token-sum-norm"):
        return masked.sum() / normaliser
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def policy_loss(
    logp: torch.Tensor,  # (N, T) log pi(o_t) under the current policy (logits / temperature)
    old_logp: torch.Tensor,  # (N, T) the same under pi_old (rollout time), no grad
    advantages: torch.Tensor,  # (N,) one per completion
    mask: torch.Tensor,  # (N, T) bool, completion tokens incl. EOS
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    normaliser: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,  # (N, T) under the frozen reference; needed when beta > 0
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate + beta * KL, aggregated; returns (loss, detached per-token stats sums)."""
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages[:, None]  # (N, 1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # (N, T): the pessimistic bound

    stats = {
        # The clip is active when the ratio left the trust region in the direction the advantage pushes it.
        "clip_low": ((ratio < 1.0 - clip_low) & (adv < 0)).float(),
        "clip_high": ((ratio > 1.0 + clip_high) & (adv > 0)).float(),
    }
    if beta > 0:
        assert ref_logp is not None, "beta > 0 needs the reference model's log-probs"
        kl = kl_per_token(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        stats["kl"] = kl.detach()
    loss = aggregate_tokens(per_token, mask, aggregation, normaliser)
    token_sums = {name: (value * mask).sum().detach() for name, value in stats.items()}
    return loss, token_sums


class AdaptiveKLController:
    """OpenRLHF's / Ziegler et al.'s proportional controller: beta grows when KL overshoots the target.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon)
    """

    def __init__(self, init_beta: float, target: float, horizon: int = 10000):
        self.value = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


class FixedKLController:
    """A constant beta (with the same interface as the adaptive controller)."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
