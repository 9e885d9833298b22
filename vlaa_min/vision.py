"""The vision tower of Qwen2-VL / Qwen2.5-VL: image patches in, one language-model token per 2x2 patches out.

A patch embedding (a Conv3d over temporal_patch x patch x patch, applied as one matmul per patch), 2-D rotary
embeddings (half of each head rotates by the patch's row, half by its column), blocks of bidirectional attention
restricted to each image (Qwen2.5: to each window of the image, except at `fullatt_block_indexes`), and the merger
that turns every 2x2 block of patches into one token for the language model (vlaa_min/model.py scatters them
into the <|image_pad|> positions).

Differences from transformers' code: images only (no videos); the images / windows are padded into one batch of
segments with a key mask for torch's scaled_dot_product_attention instead of a flash-attention varlen call.

Usage (VLModel.encode_images calls it):
    features = tower(pixel_values, image_grid_thw)  # (N_patches, C*T*P*P), (I, 3) -> (N_patches / 4, D_text)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlaa_min.config import VisionConfig
from vlaa_min.layers import RMSNorm, SwiGLU, activation, apply_rotary, inverse_frequencies


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
