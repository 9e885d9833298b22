"""The three kinds of past (cache.py) against one plain attention over the whole sequence.

Each past builds its mask (`past.mask`) and attends (`past.attend`) for the new tokens only; the reference is
softmax(q k^T / sqrt(Dh)) v over every key, written out with each KV head repeated for its query heads and the
mask `causal_mask` gives the whole sequence. Random q, k, v; left padding in the first rows.
"""

import torch

from vlaa_min.cache import GroupedKVCache, KVCache, PrefixKV, causal_mask, fold_mask, grouped_attention

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
GROUPS = HEADS // KV_HEADS


def reference_attention(q, k, v, mask):
    """q (B, H, T, Dh), k and v (B, Hkv, S, Dh), mask (B, 1, T, S) bool -> (B, H, T, Dh)."""
    k, v = k.repeat_interleave(GROUPS, dim=1), v.repeat_interleave(GROUPS, dim=1)  # head h reads KV head h // G
    scores = (q @ k.transpose(-1, -2)) / HEAD_DIM**0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def random_qkv(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator)
    v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator)
    return q, k, v


def left_padded(batch, length, pads):
    return torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]  # (B, T) bool


def test_no_past_is_causal_attention():
    q, k, v = random_qkv(2, 6, seed=0)
    valid = left_padded(2, 6, [0, 2])
    mask = causal_mask(valid)
    torch.testing.assert_close(grouped_attention(q, k, v, fold_mask(mask, GROUPS)), reference_attention(q, k, v, mask))


def test_prefix_then_new_tokens_is_attention_over_both():
    batch, prefix_len, new = 2, 5, 3
    q, k, v = random_qkv(batch, prefix_len + new, seed=1)
    valid = left_padded(batch, prefix_len + new, [0, 3])
    full = reference_attention(q, k, v, causal_mask(valid))[:, :, prefix_len:]  # the new tokens' rows

    prefix = PrefixKV([(k[:, :, :prefix_len], v[:, :, :prefix_len])], valid[:, :prefix_len])
    mask = prefix.mask(valid[:, prefix_len:])
    out = prefix.attend(0, q[:, :, prefix_len:], k[:, :, prefix_len:], v[:, :, prefix_len:], fold_mask(mask, GROUPS))
    torch.testing.assert_close(out, full)


def test_kv_cache_prefill_and_step_are_attention_over_the_sequence():
    batch, prompt, slots = 2, 5, 8
    q, k, v = random_qkv(batch, prompt + 1, seed=2)
    valid = left_padded(batch, prompt + 1, [1, 0])
    full = reference_attention(q, k, v, causal_mask(valid))

    cache = KVCache(1, batch, slots, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    prefill_slots = torch.arange(prompt)
    mask = cache.mask(valid[:, :prompt], prefill_slots)  # (B, 1, T, S_max): spare slots stay invalid
    out = cache.attend(0, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], fold_mask(mask, GROUPS), prefill_slots)
    torch.testing.assert_close(out, full[:, :, :prompt])

    step_slot = torch.tensor([prompt])
    mask = cache.mask(valid[:, prompt:], step_slot)  # (B, 1, 1, S_max)
    out = cache.attend(0, q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], fold_mask(mask, GROUPS), step_slot)
    torch.testing.assert_close(out, full[:, :, prompt:])


def test_grouped_cache_step_is_attention_over_each_rows_prompt_and_tokens():
    prompts, group, prompt_len, steps = 2, 3, 4, 2
    generator = torch.Generator().manual_seed(3)
    prompt_k = torch.randn(prompts, KV_HEADS, prompt_len, HEAD_DIM, generator=generator)
    prompt_v = torch.randn(prompts, KV_HEADS, prompt_len, HEAD_DIM, generator=generator)
    prompt_valid = left_padded(prompts, prompt_len, [0, 1])
    rows = prompts * group
    q, k, v = random_qkv(rows, steps, seed=4)
    # Each row's whole sequence: its prompt's keys/values, then its own generated ones.
    row_k = torch.cat([prompt_k.repeat_interleave(group, 0), k], dim=2)
    row_v = torch.cat([prompt_v.repeat_interleave(group, 0), v], dim=2)
    row_valid = torch.cat([prompt_valid.repeat_interleave(group, 0), torch.ones(rows, steps, dtype=torch.bool)], 1)
    full = reference_attention(torch.cat([torch.zeros(rows, HEADS, prompt_len, HEAD_DIM), q], dim=2), row_k, row_v,
                               causal_mask(row_valid))[:, :, prompt_len:]

    prompt = KVCache(1, prompts, prompt_len, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    prompt.k[0], prompt.v[0], prompt.valid[:] = prompt_k, prompt_v, prompt_valid
    cache = GroupedKVCache(prompt, group, max_new_tokens=steps + 1)  # a spare generated slot stays invalid
    for step in range(steps):
        slot = torch.tensor([prompt_len + step])
        bias = cache.mask(torch.ones(rows, 1, dtype=torch.bool), slot)  # (N, 1, 1, S_p + L) additive
        out = cache.attend(0, q[:, :, step : step + 1], k[:, :, step : step + 1], v[:, :, step : step + 1], bias,
                           slot)
        torch.testing.assert_close(out, full[:, :, step : step + 1])
