"""Qwen2-VL and Qwen2.5-VL for causal LM, written out: vision tower, patch merger, MRoPE decoder.

What is in here, top to bottom (the configs live in config.py, the key/value caches in cache.py):
  * the vision tower: a patch embedding (a Conv3d over temporal_patch x patch x patch, applied as
    one matmul per patch), 2-D rotary embeddings, blocks of bidirectional attention restricted to
    each image (Qwen2.5: to each window, except at `fullatt_block_indexes`), and the merger that
    turns every 2x2 block of patches into one language-model token;
  * the language model: a Qwen2 decoder (GQA, RMSNorm, SwiGLU, q/k/v bias) with MRoPE, the image
    features scattered into the <|image_pad|> positions, tied or untied lm_head; its attention
    writes to and reads from a `KVCache` (prefill), a `GroupedKVCache` (decode, each prompt's
    keys/values once for its G samples) or a `PrefixKV` (training, a shared prefix run once);
  * `VLModel.from_pretrained` / `save_pretrained`: Hugging Face checkpoints (config.json + safetensors,
    single file or sharded), the ones transformers loads and saves.

The paper trains the released Qwen2-VL / Qwen2.5-VL checkpoints, so this is their architecture
unchanged (its logits match transformers' in fp32: tests/test_model.py). Differences from
transformers' code: videos are not supported (images only); sliding-window attention in the decoder
(off in every released checkpoint) is refused; all attention goes through torch's
scaled_dot_product_attention (images / windows are padded into one batch of segments with a key
mask instead of a flash-attention varlen call); a padding query attends to itself (never NaN).

Usage:
    model = VLModel.from_pretrained("path/to/Qwen2.5-VL-3B-Instruct", dtype=torch.bfloat16, device="cuda")
    position_ids = mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id=...,
                                      spatial_merge_size=...)  # vlaa_min/rope.py
    logits = model(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw)  # (B, T, V)
    model.save_pretrained("runs/step_100")
"""

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlaa_min.cache import GroupedKVCache, KVCache, PrefixKV
from vlaa_min.checkpoint import atomic_directory, load_state_dict, save_state_dict
from vlaa_min.config import ModelConfig, TextConfig, VisionConfig

def _dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (expected e.g. 'bfloat16', 'float32')")
    return dtype


# --------------------------------------------------------------------------- shared pieces


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


ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "quick_gelu": QuickGELU}


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


# --------------------------------------------------------------------------- vision tower


class PatchEmbed(nn.Module):
    """One patch (C x temporal x P x P pixels, flattened) -> one vector. Stored as the Conv3d the
    checkpoints hold; applied as a matmul because each patch is exactly one kernel position."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (D, C*T*P*P)
        if pixel_values.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[-1]} values per patch, the vision tower expects "
                f"{weight.shape[1]} (channels * temporal_patch_size * patch_size^2)"
            )
        return pixel_values.to(weight.dtype) @ weight.T  # (N, D)


class Segments:
    """A packed sequence cut into independent segments (images or windows), laid out as a padded
    batch (S, L_max) so that one SDPA call attends within every segment at once."""

    def __init__(self, lengths: list[int], device: torch.device):
        self.max_len = max(lengths)
        lengths_t = torch.tensor(lengths, device=device)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        offsets = torch.arange(self.max_len, device=device)
        self.valid = offsets[None, :] < lengths_t[:, None]  # (S, L_max)
        self.index = torch.where(self.valid, starts[:, None] + offsets[None, :], 0)  # (S, L_max) into the sequence
        # Equal-length segments need no key mask (and then use the faster SDPA kernels).
        self.key_mask = None if min(lengths) == self.max_len else self.valid[:, None, None, :]  # (S, 1, 1, L_max)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # 3 x (N, H, Dh)
        # Rotary in float32 (cos/sin are (N, Dh) float32).
        q = apply_rotary(q.float(), cos[:, None], sin[:, None]).to(v.dtype)
        k = apply_rotary(k.float(), cos[:, None], sin[:, None]).to(v.dtype)
        q, k, v = (t[segments.index].transpose(1, 2) for t in (q, k, v))  # (S, H, L_max, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=segments.key_mask)  # (S, H, L_max, Dh)
        out = out.transpose(1, 2)[segments.valid]  # (N, H, Dh): back in sequence order
        return self.proj(out.reshape(n, dim))


class VisionMLP(nn.Module):
    """Qwen2-VL's fc1 -> act -> fc2."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, model_type: str):
        super().__init__()
        if model_type == "qwen2_5_vl":
            self.norm1 = RMSNorm(config.hidden_size, eps=1e-6)
            self.norm2 = RMSNorm(config.hidden_size, eps=1e-6)
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act, bias=True)
        else:
            self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
            self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
            self.mlp = VisionMLP(config)
        self.attn = VisionAttention(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Every merge x merge block of consecutive patches -> one language-model token."""

    def __init__(self, config: VisionConfig, model_type: str):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        norm = RMSNorm if model_type == "qwen2_5_vl" else nn.LayerNorm
        self.ln_q = norm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.ln_q(x).view(-1, self.mlp[0].in_features)  # (N / merge^2, merge^2 * D)
        return self.mlp(merged)


def patch_rows_cols(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """(N, 2) row and column of every patch, in the processor's order: merge x merge blocks row by row,
    patches within a block row by row, frames one after another."""
    coords = []
    for t, h, w in grid_thw:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        blocked = [c.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for c in (rows, cols)]
        coords.append(torch.stack(blocked, dim=-1).repeat(t, 1))
    return torch.cat(coords)


def window_order(grid_thw: list[list[int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5 windows: tile each frame's merged grid with window x window squares (row by row, the
    last row/column of windows possibly smaller). Returns the merged-token order that makes every
    window contiguous, and each window's length in patches."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        grid_h, grid_w = h // merge, w // merge
        tokens = torch.arange(t * grid_h * grid_w).view(t, grid_h, grid_w) + offset
        for frame in tokens:
            for top in range(0, grid_h, window):
                for left in range(0, grid_w, window):
                    block = frame[top : top + window, left : left + window].flatten()
                    order.append(block)
                    lengths.append(block.numel() * merge * merge)
        offset += t * grid_h * grid_w
    return torch.cat(order), lengths


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig, model_type: str):
        super().__init__()
        self.config = config
        self.windowed = model_type == "qwen2_5_vl"
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList([VisionBlock(config, model_type) for _ in range(config.depth)])
        self.merger = PatchMerger(config, model_type)
        self.gradient_checkpointing = False

    def rotary(self, grid_thw: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, Dh) float32: the first half of each head rotates by row, the second by column."""
        inv_freq = inverse_frequencies(self.config.head_dim // 2, self.config.rope_theta, device)  # (Dh/4,)
        coords = patch_rows_cols(grid_thw, self.config.spatial_merge_size).to(device)  # (N, 2)
        angles = (coords[:, :, None].float() * inv_freq).flatten(1)  # (N, Dh/2): rows' angles, then columns'
        angles = torch.cat([angles, angles], dim=-1)  # (N, Dh)
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N_patches, C*T*P*P), image_grid_thw (I, 3) -> (N_patches / merge^2, out_hidden_size)."""
        grids = image_grid_thw.reshape(-1, 3).tolist()
        if not grids:
            raise ValueError("encode_images: image_grid_thw holds no image")
        merge = self.config.spatial_merge_size
        unit = merge * merge
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected or any(h % merge or w % merge for _, h, w in grids):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grids} needs {expected} "
                f"(and h, w divisible by spatial_merge_size {merge})"
            )
        device = pixel_values.device
        x = self.patch_embed(pixel_values)  # (N, D)
        cos, sin = self.rotary(grids, device)  # (N, Dh)
        per_frame = Segments([h * w for t, h, w in grids for _ in range(t)], device)
        windows = per_frame
        if self.windowed:
            window = self.config.window_size // (merge * self.config.patch_size)  # in merged tokens
            order, window_lengths = window_order(grids, merge, window)
            order = order.to(device)
            # Reorder whole merge blocks so that every window is contiguous (frames stay contiguous too).
            x, cos, sin = (t.view(-1, unit, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
            windows = Segments(window_lengths, device)
        for index, block in enumerate(self.blocks):
            full = not self.windowed or index in self.config.fullatt_block_indexes
            segments = per_frame if full else windows
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, segments, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments)
        merged = self.merger(x)  # (N / merge^2, D_out)
        if self.windowed:
            merged = merged[torch.argsort(order)]  # back to the processor's token order
        return merged


# --------------------------------------------------------------------------- language model


class Attention(nn.Module):
    """Causal grouped-query self-attention with MRoPE and an optional static KV cache."""

    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_position: torch.Tensor | None = None,
                prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Output (B, T, D) and this layer's new keys/values (B, Hkv, T, Dh) (what `PrefixKV` collects).
        With `cache` the keys/values go to the static cache in place (generation); with `prefix_kv` the new
        tokens also attend to the prefix's keys/values, concatenated in front (training, autograd-friendly)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_kv = (k, v)
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)  # (B, Hkv, S + T, Dh)
            v = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        if isinstance(cache, GroupedKVCache):  # a decode step of G samples per prompt
            out = cache.attend(self.layer_index, q, k, v, cache_position, mask)  # (B, H, 1, Dh)
            return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), new_kv
        if cache is not None:
            k_cache, v_cache = cache.layers[self.layer_index]  # (B, Hkv, S_max, Dh)
            # Cast on write: under autocast k and v can come out in different dtypes than the cache's.
            k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
            v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
            k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)
        # Grouped-query attention without copying K/V per query head (costly over a long cache): the
        # query heads sharing a KV head are folded into its query axis; `mask` was repeated to match.
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups * length, self.head_dim)  # (B, Hkv, G*T, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, Dh)
        # reshape, not view: CUDA's attention kernels may return another memory layout than the CPU's.
        out = out.reshape(batch, self.num_heads, length, self.head_dim)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), new_kv


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, cache_position=None, prefix_kv=None):
        """(B, T, D) -> (B, T, D), and the layer's new keys/values (see Attention.forward)."""
        attended, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position, prefix_kv)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class LanguageModel(nn.Module):
    """Token embeddings, decoder layers, final norm (the hub's `model.*` weights)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def mrope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, Dh): frequency pair i rotates by the t, h or w position depending on
        which mrope_section it falls in."""
        inv_freq = inverse_frequencies(self.config.head_dim, self.config.rope_theta, position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # (3, B, T, Dh/2)
        sections = angles.split(self.config.mrope_section, dim=-1)
        angles = torch.cat([section[axis] for axis, section in enumerate(sections)], dim=-1)  # (B, T, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, Dh)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, embeds, position_ids, mask, cache, cache_position, gradient_checkpointing: bool,
                prefix: PrefixKV | None = None):
        """Final-normed hidden states (B, T, D), and every layer's new keys/values."""
        cos, sin = self.mrope(position_ids, embeds.dtype)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        if mask.shape[2] > 1:  # (B, 1, G*T, S): one copy per folded query head (see Attention); one query broadcasts
            mask = mask.repeat(1, 1, groups, 1)
        x = embeds  # (B, T, D)
        layers_kv = []
        for i, layer in enumerate(self.layers):
            prefix_kv = prefix.layers[i] if prefix is not None else None
            if gradient_checkpointing and self.training and cache is None:
                x, new_kv = checkpoint(layer, x, cos, sin, mask, None, None, prefix_kv, use_reentrant=False)
            else:
                x, new_kv = layer(x, cos, sin, mask, cache, cache_position, prefix_kv)
            layers_kv.append(new_kv)
        return self.norm(x), layers_kv


def attention_mask_4d(key_valid: torch.Tensor, query_slots: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool: a query sees valid keys at or before its own slot, and always itself (so a
    padding query whose every key is masked attends to itself instead of producing NaN)."""
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    itself = key_slots[None, :] == query_slots[:, None]  # (T, S)
    return ((key_valid[:, None, :] & causal) | itself)[:, None]


# --------------------------------------------------------------------------- the whole model


def _hf_to_ours(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor name (hub legacy or transformers-5 layout)."""
    for prefix, ours in (
        ("model.language_model.", "language_model."),
        ("model.visual.", "visual."),
        ("model.", "language_model."),
        ("visual.", "visual."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return None


def _ours_to_hf(name: str) -> str:
    """The hub's legacy names (what transformers 5 itself writes): model.*, visual.*, lm_head.*."""
    if name.startswith("language_model."):
        return "model." + name[len("language_model.") :]
    return name


class VLModel(nn.Module):
    """Qwen2-VL / Qwen2.5-VL for causal LM: `visual` (vision tower + merger), `language_model`, `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTower(config.vision, config.model_type)
        self.language_model = LanguageModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        # Qwen's (and transformers') default: N(0, 0.02) weights, zero biases, unit norms.
        std = self.config.text.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(N_patches, C*T*P*P), (I, 3) -> (N_image_tokens, D) features, images in order."""
        self.visual.gradient_checkpointing = self.gradient_checkpointing
        return self.visual(pixel_values, image_grid_thw)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        cache: KVCache | GroupedKVCache | None = None,
        cache_position: torch.Tensor | None = None,
        return_hidden: bool = False,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or with return_hidden the final-normed hidden states (B, T, D).

        input_ids (B, T); position_ids (3, B, T) from vlaa_min.rope; attention_mask (B, T) bool (True =
        real token; None = all real); pixel_values/image_grid_thw for the <|image_pad|> tokens in
        input_ids. With a cache, the T new tokens go to slots `cache_position` (T,) of every row. With a
        prefix (from `encode_prefix`, one per row), the T tokens continue it: position_ids must go on from
        the prefix's.
        """
        hidden, _ = self._decode(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, cache,
                                 cache_position, prefix)
        return hidden if return_hidden else self.lm_head(hidden)

    def encode_prefix(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> PrefixKV:
        """The keys/values of input_ids (B, S) at every layer, for `forward(prefix=...)`; gradients flow."""
        _, layers_kv = self._decode(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return PrefixKV(layers_kv, valid)

    def _decode(self, input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, cache=None,
                cache_position=None, prefix=None) -> tuple[torch.Tensor, list]:
        """Embed (images scattered in), mask, run the decoder: hidden (B, T, D) and each layer's new k/v.

        The mask is (valid key) & (key slot <= query slot), plus the query's own slot. Without a cache, slots are
        sequence indices; with a `KVCache` the new tokens are written at `cache_position` and attend over all
        S_max slots, `cache.valid` marking the ones that hold real tokens, so every decode step has the same
        shapes (no .item()). A one-token step on a cache needs no causal mask (slots fill in order); with a
        `PrefixKV` the new tokens see every valid prefix slot and each other causally.
        """
        batch, length = input_ids.shape
        if position_ids.shape != (3, batch, length):
            raise ValueError(f"position_ids must be (3, {batch}, {length}), got {tuple(position_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()

        embeds = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("forward: pixel_values given without image_grid_thw")
            features = self.encode_images(pixel_values, image_grid_thw).to(embeds.dtype)  # (N_img, D)
            n_tokens = int(image_mask.sum())
            if n_tokens != features.shape[0]:
                raise ValueError(
                    f"forward: input_ids hold {n_tokens} <|image_pad|> tokens (id {self.config.image_token_id}) "
                    f"but the images give {features.shape[0]} features"
                )
            embeds = embeds.masked_scatter(image_mask[..., None], features)
        elif cache is None and bool(image_mask.any()):
            raise ValueError("forward: input_ids hold <|image_pad|> tokens but no pixel_values were given")

        if cache is not None and prefix is not None:
            raise ValueError("forward: a static cache (generation) and a prefix (training) exclude each other")
        if cache is not None and (cache_position is None or cache_position.shape != (length,)):
            raise ValueError(f"forward: with a cache, cache_position must be a ({length},) tensor of slots")
        if isinstance(cache, GroupedKVCache):
            if length != 1:
                raise ValueError("forward: a GroupedKVCache takes one new token per row (decode steps)")
            cache.valid.index_copy_(1, cache_position - cache.prompt_len, attention_mask)
            mask = cache.attention_bias()  # (B, 1, 1, S_p + L)
        elif cache is None:
            past = prefix.length if prefix is not None else 0
            key_valid = attention_mask if prefix is None else torch.cat([prefix.valid, attention_mask], dim=1)
            key_slots = torch.arange(past + length, device=input_ids.device)
            mask = attention_mask_4d(key_valid, key_slots[past:], key_slots)  # (B, 1, T, S + T)
        else:
            cache.valid.index_copy_(1, cache_position, attention_mask)
            if length == 1:  # a decode step: the cache fills in slot order, so every valid slot is at or before it
                mask = cache.valid[:, None, None, :]  # (B, 1, 1, S_max)
            else:
                key_slots = torch.arange(cache.max_len, device=input_ids.device)
                mask = attention_mask_4d(cache.valid, cache_position, key_slots)  # (B, 1, T, S_max)

        return self.language_model(
            embeds, position_ids, mask, cache, cache_position, self.gradient_checkpointing, prefix
        )  # (B, T, D), per layer (k, v)

    # ----------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> "VLModel":
        """Load config.json + model.safetensors (or a sharded index) in either naming layout."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file} not found")
        config = ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
        dtype = _dtype_from_name(dtype if dtype is not None else config.torch_dtype)
        config.torch_dtype = str(dtype).removeprefix("torch.")

        state_dict, unexpected = {}, []
        for name, tensor in load_state_dict(path, device=device).items():
            ours = _hf_to_ours(name)
            if ours is None:
                unexpected.append(name)
            else:
                state_dict[ours] = tensor.to(dtype)
        if config.tie_word_embeddings:
            state_dict.pop("lm_head.weight", None)  # some checkpoints store the tied copy too

        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        if config.tie_word_embeddings:
            expected.discard("lm_head.weight")  # re-tied below
        missing = sorted(expected - set(state_dict))
        unexpected += sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path}: checkpoint does not match the config: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        model.load_state_dict(state_dict, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.language_model.embed_tokens.weight
        return model.to(device)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Atomically write config.json + safetensors (hub names; sharded above max_shard_bytes).

        state_dict: the weights to write instead of this module's own (the full weights of a sharded model).
        """
        self.config.torch_dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        state_dict = {
            _ours_to_hf(name): tensor
            for name, tensor in (self.state_dict() if state_dict is None else state_dict).items()
            if not (self.config.tie_word_embeddings and name == "lm_head.weight")
        }
        with atomic_directory(path) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
            save_state_dict(state_dict, tmp, max_shard_bytes=max_shard_bytes)
