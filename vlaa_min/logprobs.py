"""Log-probabilities of chosen tokens, computed only where needed and in chunks.

The path from GRPO's log pi(o_t) to the logits, in the order it runs (completion_logprobs):
  1. `VLModel.encode_prefix(prompts)` (model.py) runs each prompt once (its images encoded once) and returns its
     keys/values at every layer as a `PrefixKV` (cache.py); `select` hands each completion its prompt's.
  2. `VLModel.forward(completion, past=prefix)` embeds the tokens, takes the mask from `prefix.mask`, and runs
     the decoder layers; in each, `Attention.forward` projects q/k/v, applies MRoPE and calls `PrefixKV.attend`
     (the prefix's keys/values in front of the new ones, one scaled-dot-product attention); then the MLP.
     The final norm gives the hidden states.
  3. `token_logprobs` (here): the hidden states of completion positions -> lm_head -> / temperature ->
     log_softmax -> gather the chosen token's entry.

The language-model head maps D -> V (V = 151,936 for Qwen), so logits for every position of a batch, (B, T, V)
in float32, are the largest tensor of a training step. So only the scored positions (assistant tokens in SFT,
completion tokens in GRPO) go through the head, in chunks; with gradients on and several chunks, each chunk is
recomputed in the backward pass (activation checkpointing): at most one (chunk, V) block of logits is alive.

Shared beginnings run once (PrefixKV): a GRPO prompt for all G of its completions (completion_logprobs), and the
system prompt every SFT sample starts with (masked_logprobs). Same values and gradients as full forwards
(tests/test_shared_prefix.py), a fraction of the tokens.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlaa_min.rope import next_position_ids


# Logits elements per chunk: 2^27 (512 MiB in float32) is ~880 positions of Qwen's 151,936-token vocabulary, and
# 131,072 positions of the toy model's <= 1,024-token one (a whole micro-batch in one chunk: nothing to recompute).
LOGITS_PER_CHUNK = 2**27


def _chunk_logprobs(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    logits = F.linear(hidden, weight, bias).float() / temperature  # (M, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, targets[:, None]).squeeze(1)  # (M,)
    if not with_entropy:
        return chosen, None
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # (M,), a metric: no gradient
    return chosen, entropy


def token_logprobs(
    hidden: torch.Tensor,  # (M, D) hidden states that predict `targets`
    lm_head: torch.nn.Linear,
    targets: torch.Tensor,  # (M,) token ids
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(lm_head(h) / temperature)[target] for each row, and optionally the entropy (detached).

    chunk_size: positions per chunk (default: LOGITS_PER_CHUNK logits). With several chunks and gradients on,
    each chunk's logits are recomputed in the backward pass instead of kept; a single chunk is simply kept.
    """
    chunk_size = chunk_size or max(1, LOGITS_PER_CHUNK // lm_head.out_features)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_size
    chosen_parts, entropy_parts = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
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
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the masked tokens given their prefix (0 elsewhere), and the entropy likewise."""
    if bool(target_mask[:, 0].any()):
        raise ValueError("sequence_logprobs: target_mask marks position 0, which has no prefix to predict it from")
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


def shared_prefix_length(
    input_ids: torch.Tensor,  # (B, T)
    position_ids: torch.Tensor,  # (3, B, T)
    attention_mask: torch.Tensor,  # (B, T) bool
    target_mask: torch.Tensor,  # (B, T) bool
    image_token_id: int,
) -> int:
    """How many leading tokens all rows share and can run once as a PrefixKV: the same ids and positions in
    every row, all real, no image placeholder (same id, different pixels), and none needed to predict a target."""
    same = (
        (input_ids == input_ids[:1]).all(0)
        & (position_ids == position_ids[:, :1]).all(0).all(0)
        & attention_mask.all(0)
        & (input_ids != image_token_id).all(0)
    )  # (T,)
    length = input_ids.shape[1]
    shared = length if bool(same.all()) else int((~same).int().argmax())
    first_target = int(target_mask.any(0).int().argmax()) if bool(target_mask.any()) else length
    return max(0, min(shared, first_target - 1))  # target t is predicted by hidden state t - 1


def masked_logprobs(
    model,
    input_ids: torch.Tensor,  # (B, T)
    position_ids: torch.Tensor,  # (3, B, T)
    attention_mask: torch.Tensor,  # (B, T) bool
    target_mask: torch.Tensor,  # (B, T) bool: the tokens to score
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(B, T) log-probs of the masked tokens given everything before them (0 elsewhere), as one plain forward
    would give them, but the leading tokens every row shares (an SFT batch's system prompt) run once, for row 0,
    and reach the other rows as a PrefixKV."""
    batch = input_ids.shape[0]
    shared = shared_prefix_length(input_ids, position_ids, attention_mask, target_mask, model.config.image_token_id)
    prefix = None
    if batch > 1 and shared > 1:
        prefix = model.encode_prefix(input_ids[:1, :shared], position_ids[:, :1, :shared], attention_mask[:1, :shared])
        prefix = prefix.select(torch.zeros(batch, dtype=torch.long, device=input_ids.device))
    else:
        shared = 0
    hidden = model(input_ids[:, shared:], position_ids[:, :, shared:], attention_mask[:, shared:], pixel_values,
                   image_grid_thw, return_hidden=True, past=prefix)  # (B, T - shared, D)
    logp, _ = sequence_logprobs(hidden, input_ids[:, shared:], target_mask[:, shared:], model.lm_head, temperature,
                                chunk_size)
    return F.pad(logp, (shared, 0))  # (B, T)


def completion_logprobs(
    model,
    prompts,  # PromptBatch: each distinct prompt once, left padded (P, Tp), on the model's device
    completion_ids: torch.Tensor,  # (n, L) right padded
    completion_lengths: torch.Tensor,  # (n,) stop token included
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    prompt_rows: torch.Tensor | None = None,  # (n,) completion i continues prompt prompt_rows[i]; default i
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-score completions: (n, L) log-probs (0 past each length), and the entropy likewise.

    Each prompt runs once, however many of its completions are scored (its images are encoded once): all but its
    last token become a PrefixKV, handed to each of its completions, which run [last prompt token, completion
    tokens but the last] on top, so suffix position j predicts completion token j. With G samples per prompt and
    prompts ~5x as long as completions (the toy default), that is ~4x fewer tokens than G full sequences, with
    the same log-probs. The completion continues the prompt's MRoPE positions (every text token has
    t = h = w): next_position + 0, 1, 2, ... on all three axes, exactly as the generation engine assigned them.
    """
    n, length = completion_ids.shape
    device = completion_ids.device
    if prompts.input_ids.shape[1] < 2:
        raise ValueError("completion_logprobs: prompts need at least 2 tokens (a prefix and a last token)")
    if not bool(prompts.attention_mask[:, -1].all()):
        raise ValueError("completion_logprobs: prompts must be LEFT padded (every row's last column a real token)")
    if prompt_rows is None:
        prompt_rows = torch.arange(n, device=device)
    prefix = model.encode_prefix(prompts.input_ids[:, :-1], prompts.position_ids[:, :, :-1],
                                 prompts.attention_mask[:, :-1], prompts.pixel_values, prompts.image_grid_thw)
    prefix = prefix.select(prompt_rows)

    steps = torch.arange(length, device=device)
    completion_mask = steps[None, :] < completion_lengths[:, None]  # (n, L)
    last_token = prompts.input_ids[:, -1:].index_select(0, prompt_rows)  # (n, 1)
    input_ids = torch.cat([last_token, completion_ids[:, :-1]], dim=1)  # (n, L)
    attention_mask = torch.cat([torch.ones_like(last_token, dtype=torch.bool), completion_mask[:, :-1]], dim=1)
    start = next_position_ids(prompts.position_ids, prompts.attention_mask).index_select(0, prompt_rows)  # (n,)
    last_position = prompts.position_ids[:, :, -1:].index_select(1, prompt_rows)  # (3, n, 1)
    completion_positions = (start[:, None] + steps[None, :-1]).expand(3, n, length - 1)  # (3, n, L - 1)
    position_ids = torch.cat([last_position, completion_positions], dim=2)  # (3, n, L)
    hidden = model(input_ids, position_ids, attention_mask, return_hidden=True, past=prefix)  # (n, L, D)

    chosen, entropy = token_logprobs(hidden[completion_mask], model.lm_head, completion_ids[completion_mask],
                                     temperature, chunk_size, with_entropy)
    logp = torch.zeros(n, length, dtype=torch.float32, device=device).masked_scatter(completion_mask, chosen)
    if entropy is None:
        return logp, None
    return logp, torch.zeros_like(logp).masked_scatter(completion_mask, entropy)
