"""Key/value caches of the decoder (vlaa_min.model's attention reads and writes them).

  * `KVCache`: preallocated, static keys/values written in place: the generation engine's prefill.
  * `GroupedKVCache`: the engine's decode cache; each prompt's keys/values once for its G samples.
  * `PrefixKV`: keys/values of a shared prefix for training forwards, still attached to the autograd graph (a GRPO
    prompt runs once for its G completions, an SFT batch's system prompt once for all its samples).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for the annotation only: model.py imports this module
    from vlaa_min.model import VLModel


class KVCache:
    """Preallocated keys/values for every layer: k, v (L, B, H_kv, S_max, Dh); valid (B, S_max) bool
    marks slots holding a real token. The model writes new tokens at `cache_position` slots (the same
    for every row) and attends over all S_max slots, so a decode step always has the same shapes.
    Slots are filled in order (a prefill, then one slot per step), which lets a one-token step attend
    to every valid slot without a causal mask."""

    def __init__(self, num_layers, batch_size, max_len, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # One (k, v) view per layer, made once: writing through `self.k[i]` inside a compiled step would make
        # torch.compile treat the whole stacked buffer as mutated and copy all of it back every token.
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    @classmethod
    def for_model(cls, model: "VLModel", batch_size: int, max_len: int) -> "KVCache":
        text, weight = model.config.text, model.lm_head.weight
        layers, kv_heads, head_dim = text.num_hidden_layers, text.num_key_value_heads, text.head_dim
        return cls(layers, batch_size, max_len, kv_heads, head_dim, weight.dtype, weight.device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


class GroupedKVCache:
    """The decode cache of G samples per prompt: each prompt's keys/values once (the prefill's KVCache, P rows,
    slots 0..S_p-1) and each sample's generated keys/values (N = P * G rows, prompt-major, slots S_p..S_p+L-1).

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

    def attention_bias(self) -> torch.Tensor:
        """(N, 1, 1, S_p + L) float32: 0 on valid slots, -inf elsewhere."""
        prompt_valid = self.prompt.valid.repeat_interleave(self.group_size, dim=0)  # (N, S_p)
        valid = torch.cat([prompt_valid, self.valid], dim=1)
        return torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, float("-inf"))[:, None, None]

    def attend(self, layer: int, q, k, v, cache_position, bias) -> torch.Tensor:
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
        scores = torch.cat([prompt_scores, own_scores], dim=-1).float() * head_dim**-0.5 + bias
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        prompt_probs, own_probs = probs.split([prompt_len, probs.shape[-1] - prompt_len], dim=-1)
        out = by_row(by_prompt(prompt_probs) @ v_prompt.to(q.dtype)) + own_probs @ v_own.to(q.dtype)
        return out.reshape(rows, heads, 1, head_dim)


@dataclass
class PrefixKV:
    """Keys/values of a prefix for training forwards: per layer (k, v) (B, H_kv, S, Dh) after rotary, still
    attached to the autograd graph, and valid (B, S) bool marking real tokens.

    Training re-scores many sequences that share a beginning: the G completions of one GRPO prompt, or every
    SFT sample after the same system prompt. `VLModel.encode_prefix` runs the shared part once, `select` hands
    it to each row (its backward sums the rows' gradients into the prefix), and `VLModel.forward(prefix=...)`
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
