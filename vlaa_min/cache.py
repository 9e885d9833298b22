"""Past keys/values: what a decoder layer attends to besides the new tokens' own keys/values.

`VLModel.forward(..., past=...)` takes one of three kinds of past, all with the same two methods:
  * `past.mask(attention_mask, cache_position)`: the attention mask of the new tokens over past + new keys,
    built once per forward (a cache also records which of its slots now hold real tokens);
  * `past.attend(layer, q, k, v, mask, cache_position)`: one layer's attention of the new queries over the past's
    keys/values and the new ones (a cache also stores the new keys/values).
So the model's attention reads: project, rotary, then `past.attend(...)` if there is a past, else causal
attention over the new tokens (`causal_mask` + `grouped_attention`).

  * `PrefixKV` (training): a shared prefix's keys/values, still attached to the autograd graph. A GRPO prompt
    runs once for its G completions (logprobs.completion_logprobs), an SFT system prompt once for the batch.
  * `KVCache` (the generation engine's prefill): preallocated static keys/values, written in place.
  * `GroupedKVCache` (the engine's decode steps): each prompt's keys/values once for its G samples.

Grouped-query attention never copies keys/values per query head: the query heads that share a KV head are folded
into its query axis (`grouped_attention`), and the mask gets one copy per folded head (`fold_mask`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- masks and attention


def attention_mask_4d(key_valid: torch.Tensor, query_slots: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool: a query sees valid keys at or before its own slot, and always itself (so a
    padding query whose every key is masked attends to itself instead of producing NaN)."""
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    itself = key_slots[None, :] == query_slots[:, None]  # (T, S)
    return ((key_valid[:, None, :] & causal) | itself)[:, None]


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for a forward without a past: slots are sequence indices."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask_4d(attention_mask, slots, slots)


def fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, 1, T, S) -> (B, 1, groups*T, S): one copy per query head that shares a KV head, the query layout of
    `grouped_attention`. A one-query mask (B, 1, 1, S) broadcasts as it is."""
    return mask.repeat(1, 1, groups, 1) if mask.shape[2] > 1 else mask


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, Dh), k and v (B, Hkv, S, Dh), mask from `fold_mask` -> attention output (B, H, T, Dh)."""
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads * length, head_dim)  # (B, Hkv, G*T, Dh)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, Dh)
    # reshape, not view: CUDA's attention kernels may return another memory layout than the CPU's.
    return out.reshape(batch, heads, length, head_dim)


def _check_slots(cache_position: torch.Tensor | None, length: int) -> None:
    if cache_position is None or cache_position.shape != (length,):
        raise ValueError(f"forward: with a cache, cache_position must be a ({length},) tensor of slots")


# --------------------------------------------------------------------------- training: a shared prefix


@dataclass
class PrefixKV:
    """Keys/values of a prefix for training forwards: per layer (k, v) (B, H_kv, S, Dh) after rotary, still
    attached to the autograd graph, and valid (B, S) bool marking real tokens.

    Training re-scores many sequences that share a beginning: the G completions of one GRPO prompt, or every
    SFT sample after the same system prompt. `VLModel.encode_prefix` runs the shared part once, `select` hands
    it to each row (its backward sums the rows' gradients into the prefix), and `VLModel.forward(past=prefix)`
    runs only the rest. Exact: under causal attention a prefix's keys and values do not depend on what follows.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: torch.Tensor) -> "PrefixKV":
        """The prefix of row rows[i] for each i (rows (N,) long; repeats allowed)."""
        layers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.layers]
        return PrefixKV(layers, self.valid.index_select(0, rows))

    def mask(self, attention_mask: torch.Tensor, cache_position=None) -> torch.Tensor:
        """(B, 1, T, S + T) bool: the T new tokens see every valid prefix slot, and each other causally."""
        if attention_mask.shape[0] != self.valid.shape[0]:
            raise ValueError(f"forward: the prefix has {self.valid.shape[0]} rows but the batch "
                             f"{attention_mask.shape[0]} (PrefixKV.select gives each row its prefix)")
        key_valid = torch.cat([self.valid, attention_mask], dim=1)  # (B, S + T)
        slots = torch.arange(key_valid.shape[1], device=key_valid.device)
        return attention_mask_4d(key_valid, slots[self.length :], slots)

    def attend(self, layer: int, q, k, v, mask, cache_position=None) -> torch.Tensor:
        """q (B, H, T, Dh), the new k, v (B, Hkv, T, Dh) -> (B, H, T, Dh), over the prefix's keys then the new."""
        k_prefix, v_prefix = self.layers[layer]  # (B, Hkv, S, Dh)
        k = torch.cat([k_prefix.to(k.dtype), k], dim=2)  # (B, Hkv, S + T, Dh)
        v = torch.cat([v_prefix.to(v.dtype), v], dim=2)
        return grouped_attention(q, k, v, mask)


# --------------------------------------------------------------------------- generation: static caches


class KVCache:
    """The engine's prefill cache: preallocated keys/values for every layer, k, v (L, B, H_kv, S_max, Dh), and
    valid (B, S_max) bool marking slots that hold a real token. New tokens are written at `cache_position` slots
    (the same for every row) and attend over all S_max slots, so every call has the same shapes. Slots fill in
    order (a prefill, then one slot per step), so a one-token step sees every valid slot without a causal mask."""

    def __init__(self, num_layers, batch_size, max_len, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # One (k, v) view per layer, made once: writing through `self.k[i]` inside a compiled step would make
        # torch.compile treat the whole stacked buffer as mutated and copy all of it back every token.
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "KVCache":
        """A cache for a VLModel (its text config and lm_head's dtype and device)."""
        text, weight = model.config.text, model.lm_head.weight
        layers, kv_heads, head_dim = text.num_hidden_layers, text.num_key_value_heads, text.head_dim
        return cls(layers, batch_size, max_len, kv_heads, head_dim, weight.dtype, weight.device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def mask(self, attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Marks slots cache_position (T,) valid where attention_mask (B, T) holds a real token, and returns the
        mask over all slots: (B, 1, T, S_max) bool, or (B, 1, 1, S_max) for one token."""
        _check_slots(cache_position, attention_mask.shape[1])
        self.valid.index_copy_(1, cache_position, attention_mask)
        if attention_mask.shape[1] == 1:  # slots fill in order: every valid slot is at or before this one
            return self.valid[:, None, None, :]
        slots = torch.arange(self.max_len, device=self.valid.device)
        return attention_mask_4d(self.valid, cache_position, slots)

    def attend(self, layer: int, q, k, v, mask, cache_position) -> torch.Tensor:
        """Writes the new k, v (B, Hkv, T, Dh) at slots cache_position; q (B, H, T, Dh) -> (B, H, T, Dh)."""
        k_cache, v_cache = self.layers[layer]  # (B, Hkv, S_max, Dh)
        # Cast on write: under autocast k and v can come out in different dtypes than the cache's.
        k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
        return grouped_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), mask)


class GroupedKVCache:
    """The engine's decode cache for G samples per prompt: each prompt's keys/values once (the prefill's KVCache,
    P rows, slots 0..S_p-1) and each sample's generated keys/values (N = P * G rows, prompt-major, slots
    S_p..S_p+L-1).

    A decode step is bound by reading keys/values, and the prompt is most of what it attends over: here the G
    rows of a prompt read its keys/values once, as one (G * heads)-query attention, instead of from G copies.
    The softmax runs over prompt and generated slots together, so it is exactly ordinary attention.
    """

    def __init__(self, prompt: KVCache, group_size: int, max_new_tokens: int, generated=None):
        """generated: the buffers of `allocate_generated(prompt, group_size, max_new_tokens)` to write into (the
        CUDA-graph buckets share them); None allocates them."""
        self.prompt = prompt
        self.group_size = group_size
        if generated is None:
            generated = self.allocate_generated(prompt, group_size, max_new_tokens)
        self.layers, self.valid = generated
        if self.valid.shape != (prompt.batch_size * group_size, max_new_tokens):
            raise ValueError(f"GroupedKVCache: generated buffers {tuple(self.valid.shape)} do not fit "
                             f"{prompt.batch_size} prompts x {group_size} samples x {max_new_tokens} slots")

    @staticmethod
    def allocate_generated(prompt: KVCache, group_size: int, max_new_tokens: int):
        """Per layer (k, v) (N, Hkv, L, Dh) for each row's generated tokens, and their valid flags (N, L)."""
        layers, prompts, kv_heads, _, head_dim = prompt.k.shape
        shape = (prompts * group_size, kv_heads, max_new_tokens, head_dim)
        # One (k, v) pair per layer (each written in place by its layer's attention; nothing needs them stacked).
        kv = [tuple(torch.zeros(shape, dtype=prompt.k.dtype, device=prompt.k.device) for _ in "kv")
              for _ in range(layers)]
        return kv, torch.zeros(shape[0], max_new_tokens, dtype=torch.bool, device=prompt.k.device)

    @property
    def prompt_len(self) -> int:
        return self.prompt.max_len

    def mask(self, attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Marks slot cache_position (1,) valid where attention_mask (N, 1) holds a real token, and returns the
        additive bias over prompt and generated slots: (N, 1, 1, S_p + L) float32, 0 on valid slots, -inf elsewhere."""
        if attention_mask.shape[1] != 1:
            raise ValueError("forward: a GroupedKVCache takes one new token per row (decode steps)")
        _check_slots(cache_position, 1)
        self.valid.index_copy_(1, cache_position - self.prompt_len, attention_mask)
        prompt_valid = self.prompt.valid.repeat_interleave(self.group_size, dim=0)  # (N, S_p)
        valid = torch.cat([prompt_valid, self.valid], dim=1)
        return torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, float("-inf"))[:, None, None]

    def attend(self, layer: int, q, k, v, mask, cache_position) -> torch.Tensor:
        """One new token per row: q (N, H, 1, Dh), its k, v (N, Hkv, 1, Dh) -> attention output (N, H, 1, Dh)."""
        k_own, v_own = self.layers[layer]  # (N, Hkv, L, Dh)
        k_own.index_copy_(2, cache_position - self.prompt_len, k.to(k_own.dtype))
        v_own.index_copy_(2, cache_position - self.prompt_len, v.to(v_own.dtype))
        k_prompt, v_prompt = self.prompt.layers[layer]  # (P, Hkv, S_p, Dh)
        prompts, kv_heads, prompt_len, head_dim = k_prompt.shape
        rows, heads, group = q.shape[0], q.shape[1], self.group_size
        folded = heads // kv_heads  # query heads per KV head (GQA)

        def by_prompt(x):  # (N, Hkv, f, X) -> (P, Hkv, G*f, X): a prompt's G rows become more queries
            return x.reshape(prompts, group, kv_heads, folded, -1).transpose(1, 2).reshape(prompts, kv_heads,
                                                                                          group * folded, -1)

        def by_row(x):  # the inverse: (P, Hkv, G*f, X) -> (N, Hkv, f, X)
            return x.reshape(prompts, kv_heads, group, folded, -1).transpose(1, 2).reshape(rows, kv_heads, folded, -1)

        q = q.reshape(rows, kv_heads, folded, head_dim)  # (N, Hkv, f, Dh)
        prompt_scores = by_row(by_prompt(q) @ k_prompt.to(q.dtype).transpose(-1, -2))  # (N, Hkv, f, S_p)
        own_scores = q @ k_own.to(q.dtype).transpose(-1, -2)  # (N, Hkv, f, L)
        scores = torch.cat([prompt_scores, own_scores], dim=-1).float() * head_dim**-0.5 + mask
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        prompt_probs, own_probs = probs.split([prompt_len, probs.shape[-1] - prompt_len], dim=-1)
        out = by_row(by_prompt(prompt_probs) @ v_prompt.to(q.dtype)) + own_probs @ v_own.to(q.dtype)
        return out.reshape(rows, heads, 1, head_dim)


Past = PrefixKV | KVCache | GroupedKVCache  # what `VLModel.forward(past=...)` takes
