"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL for causal LM, written out: the MRoPE decoder, VLModel and its checkpoints.

What is in here, top to bottom (the configs live in config.py, the vision tower in vision.py, the past
keys/values in cache.py):
  * the language model: a Qwen2 decoder (GQA, RMSNorm, SwiGLU) with MRoPE; what Qwen3 changes is picked by
    `config.family` (config.py): q/k/v biases (Qwen2) or per-head q/k RMSNorm (Qwen3), and from the config the
    MRoPE layout (blocks or interleaved) and DeepStack. Its attention projects, rotates, then attends causally
    over the new tokens, or, given a `past` (cache.py), lets the past attend: a `PrefixKV` (training, a shared
    prefix run once), a `KVCache` (the engine's prefill) or a `GroupedKVCache` (the engine's decode steps);
  * `VLModel`: the image features scattered into the <|image_pad|> positions (and Qwen3's DeepStack features
    added to them after the first decoder layers), the decoder, the tied or untied lm_head; `forward` gives
    logits (or hidden states), `encode_prefix` a PrefixKV;
  * `VLModel.from_pretrained` / `save_pretrained`: Hugging Face checkpoints (config.json + safetensors,
    single file or sharded), the ones transformers loads and saves (and LoRA adapter directories: lora.py).

The paper trains the released Qwen2-VL / Qwen2.5-VL checkpoints, so this is their architecture (and Qwen3-VL's)
unchanged (its logits match transformers' in fp32: tests/test_model.py). Differences from
transformers' code: images only (no videos); sliding-window attention in the decoder (off in every
released checkpoint) is refused; all attention goes through torch's scaled_dot_product_attention; a
padding query attends to itself (never NaN).

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
from torch.utils.checkpoint import checkpoint

from vlaa_min.cache import GroupedKVCache, KVCache, Past, PrefixKV, causal_mask, fold_mask, grouped_attention
from vlaa_min.config import Family, ModelConfig, TextConfig
from vlaa_min.infra.checkpoint import atomic_directory, load_state_dict, save_state_dict
from vlaa_min.layers import RMSNorm, SwiGLU, apply_rotary, inverse_frequencies
from vlaa_min.vision import VisionTower


def _dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (expected e.g. 'bfloat16', 'float32')")
    return dtype


# --------------------------------------------------------------------------- language model


class Attention(nn.Module):
    """Causal grouped-query self-attention with MRoPE, over the new tokens or a past and the new tokens."""

    def __init__(self, config: TextConfig, family: Family, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=family.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=family.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=family.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qk_norm = family.qk_norm
        if self.qk_norm:  # one RMSNorm over each head's Dh, shared by the heads
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past: Past | None = None, cache_position: torch.Tensor | None = None):
        """x (B, T, D) -> output (B, T, D), and this layer's new keys/values (B, Hkv, T, Dh) after rotary (what
        encode_prefix collects into a PrefixKV). mask: from `past.mask` (or `causal_mask`), folded by `fold_mask`."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is None:
            out = grouped_attention(q, k, v, mask)  # (B, H, T, Dh)
        else:
            out = past.attend(self.layer_index, q, k, v, mask, cache_position)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, family: Family, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, family, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x, cos, sin, mask, past=None, cache_position=None):
        """(B, T, D) -> (B, T, D), and the layer's new keys/values (see Attention.forward)."""
        attended, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, cache_position)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class LanguageModel(nn.Module):
    """Token embeddings, decoder layers, final norm (the hub's `model.*` weights; Qwen3's `model.language_model.*`)."""

    def __init__(self, config: TextConfig, family: Family):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, family, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def frequency_axes(self, device: torch.device) -> torch.Tensor:
        """(Dh/2,) long: the position axis (0 = t, 1 = h, 2 = w) each frequency pair rotates by. Qwen2: contiguous
        blocks of mrope_section pairs (t t .. h h .. w w ..); Qwen3 interleaved: pairs 1, 4, 7, .. go to h and
        2, 5, 8, .. to w, mrope_section[1] and [2] of them, the rest to t (t h w t h w .. t t)."""
        section = self.config.mrope_section
        pair = torch.arange(sum(section), device=device)  # built on the device: no host copy in a decode step
        if not self.config.mrope_interleaved:
            return (pair >= section[0]).long() + (pair >= section[0] + section[1]).long()
        axes = torch.zeros_like(pair)
        for axis in (1, 2):
            axes = axes.masked_fill((pair % 3 == axis) & (pair < 3 * section[axis]), axis)
        return axes

    def mrope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, Dh): frequency pair i rotates by the t, h or w position `frequency_axes` gives it."""
        inv_freq = inverse_frequencies(self.config.head_dim, self.config.rope_theta, position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # (3, B, T, Dh/2)
        axes = self.frequency_axes(position_ids.device).expand(1, *angles.shape[1:])  # (1, B, T, Dh/2)
        angles = angles.gather(0, axes)[0]  # (B, T, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, Dh)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, embeds, position_ids, mask, past: Past | None, cache_position, gradient_checkpointing: bool,
                deepstack: list[torch.Tensor] = (), image_positions: tuple[torch.Tensor, torch.Tensor] | None = None):
        """embeds (B, T, D), mask (B, 1, T, S) -> final-normed hidden states (B, T, D), every layer's state.

        deepstack: Qwen3's features (N_img, D) per DeepStack block, added after decoder layer i to the hidden states
        at image_positions (the <|image_pad|> tokens' (row, column) indices, in the features' order). A layer's
        state is what a past keeps for it: an attention layer's new keys/values (a layer kind with a recurrent
        state would return that state here, and its past would hand it back)."""
        cos, sin = self.mrope(position_ids, embeds.dtype)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        mask = fold_mask(mask, groups)  # once for all layers
        # Caches are written in place, so only training forwards (no past, or a prefix) are recomputed.
        recompute = gradient_checkpointing and self.training and (past is None or isinstance(past, PrefixKV))
        x = embeds  # (B, T, D)
        layer_states = []
        for index, layer in enumerate(self.layers):
            if recompute:
                x, state = checkpoint(layer, x, cos, sin, mask, past, cache_position, use_reentrant=False)
            else:
                x, state = layer(x, cos, sin, mask, past, cache_position)
            layer_states.append(state)
            if index < len(deepstack):  # DeepStack: a middle vision block's view of each image token
                x = x.index_put(image_positions, deepstack[index].to(x.dtype), accumulate=True)
        return self.norm(x), layer_states


# --------------------------------------------------------------------------- the whole model


def _hf_to_ours(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor name (either family's layout: model.* / visual.*, or
    model.language_model.* / model.visual.*)."""
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


def _ours_to_hf(name: str, family: Family) -> str:
    """The family's hub names (what transformers 5 itself writes): Qwen2/2.5 model.*, visual.*; Qwen3
    model.language_model.*, model.visual.*; lm_head.* for both."""
    for ours, prefix in (("language_model.", family.text_prefix), ("visual.", family.vision_prefix)):
        if name.startswith(ours):
            return prefix + name[len(ours) :]
    return name


class VLModel(nn.Module):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL for causal LM: `visual` (vision tower + mergers), `language_model`,
    `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTower(config.vision, config.family)
        self.language_model = LanguageModel(config.text, config.family)
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

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(N_patches, C*T*P*P), (I, 3) -> (N_image_tokens, D) features, images in order, and the DeepStack
        features, one such tensor per deepstack_visual_indexes block ([] before Qwen3)."""
        self.visual.gradient_checkpointing = self.gradient_checkpointing
        return self.visual(pixel_values, image_grid_thw)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        past: Past | None = None,
        cache_position: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V), or with return_hidden the final-normed hidden states (B, T, D).

        input_ids (B, T); position_ids (3, B, T) from vlaa_min.rope; attention_mask (B, T) bool (True =
        real token; None = all real); pixel_values/image_grid_thw for the <|image_pad|> tokens in
        input_ids. past (cache.py): a PrefixKV from `encode_prefix`, one per row, which the T tokens continue
        (position_ids go on from the prefix's); or a KVCache / GroupedKVCache, whose slots `cache_position` (T,)
        the T tokens take in every row.
        """
        hidden, _ = self._run_decoder(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, past,
                                      cache_position)
        return hidden if return_hidden else self.lm_head(hidden)

    def encode_prefix(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> PrefixKV:
        """The keys/values of input_ids (B, S) at every layer, for `forward(past=...)`; gradients flow."""
        _, layers_kv = self._run_decoder(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return PrefixKV(layers_kv, valid)

    def _run_decoder(self, input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, past=None,
                     cache_position=None) -> tuple[torch.Tensor, list]:
        """Embed (images scattered in), mask, run the decoder: hidden (B, T, D) and each layer's new k/v."""
        batch, length = input_ids.shape
        if position_ids.shape != (3, batch, length):
            raise ValueError(f"position_ids must be (3, {batch}, {length}), got {tuple(position_ids.shape)}")
        if past is not None and not isinstance(past, Past):
            raise ValueError(f"forward: past must be a PrefixKV, KVCache or GroupedKVCache, got {type(past).__name__}")
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        generating = isinstance(past, (KVCache, GroupedKVCache))

        embeds = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        deepstack, image_positions = [], None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("forward: pixel_values given without image_grid_thw")
            features, deepstack = self.encode_images(pixel_values, image_grid_thw)
            features = features.to(embeds.dtype)  # (N_img, D)
            n_tokens = int(image_mask.sum())
            if n_tokens != features.shape[0]:
                raise ValueError(
                    f"forward: input_ids hold {n_tokens} <|image_pad|> tokens (id {self.config.image_token_id}) "
                    f"but the images give {features.shape[0]} features"
                )
            embeds = embeds.masked_scatter(image_mask[..., None], features)
            if deepstack:
                image_positions = image_mask.nonzero(as_tuple=True)  # row-major: the order masked_scatter fills
        elif not generating and bool(image_mask.any()):  # not checked per decode step: a host sync
            raise ValueError("forward: input_ids hold <|image_pad|> tokens but no pixel_values were given")
        if not generating and bool((input_ids == self.config.video_token_id).any()):
            raise ValueError(f"forward: input_ids hold <|video_pad|> tokens (id {self.config.video_token_id}): "
                             f"video input is not supported, only images")

        # (valid key) & (key slot <= query slot), plus the query's own slot; each past knows its slots.
        mask = causal_mask(attention_mask) if past is None else past.mask(attention_mask, cache_position)
        return self.language_model(
            embeds, position_ids, mask, past, cache_position, self.gradient_checkpointing, deepstack, image_positions
        )  # (B, T, D), per layer (k, v)

    # ----------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> "VLModel":
        """Load config.json + model.safetensors (or a sharded index) in either naming layout; a LoRA adapter
        directory (adapter_config.json: vlaa_min/lora.py) loads as its base with the adapter folded in."""
        path = Path(path)
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            from vlaa_min import lora  # lora.py builds on this file

            return lora.fold_(lora.load_lora_model(path, dtype=dtype, device=device))
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
            _ours_to_hf(name, self.config.family): tensor
            for name, tensor in (self.state_dict() if state_dict is None else state_dict).items()
            if not (self.config.tie_word_embeddings and name == "lm_head.weight")
        }
        with atomic_directory(path) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
            save_state_dict(state_dict, tmp, max_shard_bytes=max_shard_bytes)
