"""Log-probabilities of chosen tokens, computed only where needed and in chunks.

The language-model head maps D -> V (V = 151,936 for Qwen), so logits for every position of a batch,
(B, T, V) in float32, are the largest tensor of a training step. We instead gather the hidden states of the
positions that are scored (assistant tokens in SFT, completion tokens in GRPO), then run the head, the
temperature and the log-softmax on chunks of them. With gradients on, each chunk is recomputed in the
backward pass (activation checkpointing), so at most one (chunk, V) block of logits is alive at a time.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlaa_min.rope import next_position_ids


def _chunk_logprobs(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    logits = F.linear(hidden, weight, bias).float() / temperature  # (M, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, targets[:, None]).squeeze(1)  # (M,)
    if not with_entropy:
        return chosen, None
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # (M,)
    return chosen, entropy


def token_logprobs(
    hidden: torch.Tensor,  # (M, D) hidden states that predict `targets`
    lm_head: torch.nn.Linear,
    targets: torch.Tensor,  # (M,) token ids
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(lm_head(h) / temperature)[target] for each row, and optionally the entropy (detached)."""
    chosen_parts, entropy_parts = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            chosen, _ = checkpoint(
                _chunk_logprobs, h, lm_head.weight, lm_head.bias, t, temperature, False, use_reentrant=False
            )
            if with_entropy:
                with torch.no_grad():
                    _, entropy = _chunk_logprobs(h, lm_head.weight, lm_head.bias, t, temperature, True)
                entropy_parts.append(entropy)
        else:
            chosen, entropy = _chunk_logprobs(h, lm_head.weight, lm_head.bias, t, temperature, with_entropy)
            entropy_parts.append(entropy)
        chosen_parts.append(chosen)
    chosen = torch.cat(chosen_parts) if chosen_parts else hidden.new_zeros(0, dtype=torch.float32)
    entropy = torch.cat(entropy_parts) if with_entropy and entropy_parts else None
    return chosen, entropy


def sequence_logprobs(
    hidden: torch.Tensor,  # (B, T, D) final hidden states of a forward over input_ids
    input_ids: torch.Tensor,  # (B, T)
    target_mask: torch.Tensor,  # (B, T) bool: the tokens to score (never position 0)
    lm_head: torch.nn.Linear,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the masked tokens given their prefix (0 elsewhere), and the entropy likewise."""
    assert not target_mask[:, 0].any(), "position 0 has no prefix to predict it from"
    predicting = target_mask[:, 1:]  # (B, T-1): hidden state t predicts token t+1
    chosen, entropy = token_logprobs(
        hidden[:, :-1][predicting], lm_head, input_ids[:, 1:][predicting], temperature, chunk_size, with_entropy
    )
    logp = torch.zeros(target_mask.shape, dtype=torch.float32, device=hidden.device)
    logp[:, 1:] = logp[:, 1:].masked_scatter(predicting, chosen)
    if entropy is None:
        return logp, None
    entropy_full = torch.zeros_like(logp)
    entropy_full[:, 1:] = entropy_full[:, 1:].masked_scatter(predicting, entropy)
    return logp, entropy_full


def completion_logprobs(
    model,
    prompts,  # PromptBatch: left-padded prompts (n, Tp), on the model's device
    completion_ids: torch.Tensor,  # (n, L) right padded
    completion_lengths: torch.Tensor,  # (n,) stop token included
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-score completions with one forward over prompt + completion: (n, L) log-probs (0 past each length).

    The completion continues the prompt's MRoPE positions (every text token has t = h = w), so its position ids
    are next_position + 0, 1, 2, ... on all three axes, exactly as the generation engine assigned them.
    """
    n, length = completion_ids.shape
    steps = torch.arange(length, device=completion_ids.device)
    completion_mask = steps[None, :] < completion_lengths[:, None]  # (n, L)
    input_ids = torch.cat([prompts.input_ids, completion_ids], dim=1)  # (n, Tp + L)
    attention_mask = torch.cat([prompts.attention_mask, completion_mask], dim=1)
    start = next_position_ids(prompts.position_ids, prompts.attention_mask)  # (n,)
    completion_positions = (start[:, None] + steps[None, :]).expand(3, n, length)  # (3, n, L)
    position_ids = torch.cat([prompts.position_ids, completion_positions], dim=2)
    hidden = model(input_ids, position_ids, attention_mask, prompts.pixel_values, prompts.image_grid_thw,
                   return_hidden=True)  # (n, Tp + L, D)
    target_mask = torch.cat([torch.zeros_like(prompts.attention_mask), completion_mask], dim=1)
    logp, entropy = sequence_logprobs(hidden, input_ids, target_mask, model.lm_head, temperature, chunk_size,
                                      with_entropy)
    prompt_width = prompts.input_ids.shape[1]
    return logp[:, prompt_width:], (entropy[:, prompt_width:] if entropy is not None else None)
