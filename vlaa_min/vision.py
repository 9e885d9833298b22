"""The vision tower of Qwen2-VL / Qwen2.5-VL / Qwen3-VL: image patches in, one language-model token per 2x2 patches out.

A patch embedding (a Conv3d over temporal_patch x patch x patch, applied as one matmul per patch), 2-D rotary
embeddings (half of each head rotates by the patch's row, half by its column), blocks of bidirectional attention
restricted to each image (Qwen2.5: to each window of the image, except at `fullatt_block_indexes`), and the merger
that turns every 2x2 block of patches into one token for the language model (vlaa_min/model.py scatters them
into the <|image_pad|> positions). The families differ in the pieces `config.family` names (config.py): the blocks'
norm and MLP and the merger's ("clip", "swiglu", "linear_fc"), windows, and Qwen3's learned position grid.
Qwen3-VL also has DeepStack: the outputs of the blocks at `deepstack_visual_indexes` go through mergers of their own
and are returned next to the final features (model.py adds them into the first decoder layers' image tokens).

Differences from transformers' code: images only (no videos); the images / windows are padded into one batch of
segments with a key mask for torch's scaled_dot_product_attention instead of a flash-attention varlen call.

Usage (VLModel.encode_images calls it):
    features, deepstack = tower(pixel_values, image_grid_thw)  # (N_patches, C*T*P*P), (I, 3) -> (N_patches / 4,
                                                               # D_text), and one such tensor per DeepStack block
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlaa_min.config import Family, VisionConfig
from vlaa_min.layers import RMSNorm, SwiGLU, activation, apply_rotary, inverse_frequencies


class PatchEmbed(nn.Module):
    """One patch (C x temporal x P x P pixels, flattened) -> one vector. Stored as the Conv3d the
    checkpoints hold; applied as a matmul because each patch is exactly one kernel position."""

    def __init__(self, config: VisionConfig, bias: bool):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (D, C*T*P*P)
        if pixel_values.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[-1]} values per patch, the vision tower expects "
                f"{weight.shape[1]} (channels * temporal_patch_size * patch_size^2)"
            )
        out = pixel_values.to(weight.dtype) @ weight.T  # (N, D)
        return out if self.proj.bias is None else out + self.proj.bias


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


class LinearFcMLP(nn.Module):
    """Qwen3-VL's linear_fc1 -> act -> linear_fc2: the MLP of its blocks, and of its mergers after their norm."""

    def __init__(self, dim: int, hidden: int, out: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.linear_fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, family: Family):
        super().__init__()
        width = config.hidden_size
        if family.vision_block == "swiglu":
            self.norm1, self.norm2 = RMSNorm(width, eps=1e-6), RMSNorm(width, eps=1e-6)
            self.mlp = SwiGLU(width, config.intermediate_size, config.hidden_act, bias=True)
        else:
            self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
            if family.vision_block == "clip":
                self.mlp = VisionMLP(config)
            else:
                self.mlp = LinearFcMLP(width, config.intermediate_size, width, config.hidden_act)
        self.attn = VisionAttention(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Qwen2/2.5-VL: every merge x merge block of consecutive patches -> one language-model token."""

    def __init__(self, config: VisionConfig, family: Family):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        norm = RMSNorm if family.vision_block == "swiglu" else nn.LayerNorm
        self.ln_q = norm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.ln_q(x).view(-1, self.mlp[0].in_features)  # (N / merge^2, merge^2 * D)
        return self.mlp(merged)


class LinearFcMerger(LinearFcMLP):
    """Qwen3-VL's merger: a LayerNorm, then linear_fc1 -> GELU -> linear_fc2 over each merge x merge block. The main
    merger normalises each patch; the DeepStack ones (postshuffle) the concatenated block."""

    def __init__(self, config: VisionConfig, postshuffle: bool):
        merged = config.hidden_size * config.spatial_merge_size**2
        super().__init__(merged, merged, config.out_hidden_size, "gelu")
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(merged if postshuffle else config.hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.linear_fc1.in_features  # merge^2 * D
        merged = self.norm(x.view(-1, width)) if self.postshuffle else self.norm(x).view(-1, width)
        return super().forward(merged)  # (N / merge^2, D_out)


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


def position_grid_taps(grid_thw: list[list[int]], merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's learned side x side position grid, resampled bilinearly (corners aligned) to each image's h x w
    patches: for every patch, in the processor's order, the 4 grid entries around it (N, 4) and their weights (N, 4)."""
    coords = patch_rows_cols(grid_thw, merge).float()  # (N, 2) row, column
    sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid_thw]).float()  # (N, 2)
    source = coords * (side - 1) / (sizes - 1).clamp(min=1)  # (N, 2) where each patch falls on the grid
    low = source.floor().long()
    high = (low + 1).clamp(max=side - 1)
    frac = source - low  # (N, 2)
    (row_low, col_low), (row_high, col_high), (row_frac, col_frac) = low.T, high.T, frac.T
    indices = torch.stack([row_low * side + col_low, row_low * side + col_high,
                           row_high * side + col_low, row_high * side + col_high], dim=-1)
    weights = torch.stack([(1 - row_frac) * (1 - col_frac), (1 - row_frac) * col_frac,
                           row_frac * (1 - col_frac), row_frac * col_frac], dim=-1)
    return indices, weights


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig, family: Family):
        super().__init__()
        self.config = config
        self.windowed = family.vision_windows
        self.position_grid = family.position_grid
        self.patch_embed = PatchEmbed(config, bias=family.position_grid)
        if self.position_grid:
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(config, family) for _ in range(config.depth)])
        if family.vision_block == "linear_fc":
            self.merger = LinearFcMerger(config, postshuffle=False)
            self.deepstack_merger_list = nn.ModuleList(
                [LinearFcMerger(config, postshuffle=True) for _ in config.deepstack_visual_indexes])
        else:
            self.merger = PatchMerger(config, family)
        self.gradient_checkpointing = False

    def rotary(self, grid_thw: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, Dh) float32: the first half of each head rotates by row, the second by column."""
        inv_freq = inverse_frequencies(self.config.head_dim // 2, self.config.rope_theta, device)  # (Dh/4,)
        coords = patch_rows_cols(grid_thw, self.config.spatial_merge_size).to(device)  # (N, 2)
        angles = (coords[:, :, None].float() * inv_freq).flatten(1)  # (N, Dh/2): rows' angles, then columns'
        angles = torch.cat([angles, angles], dim=-1)  # (N, Dh)
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
        """pixel_values (N_patches, C*T*P*P), image_grid_thw (I, 3) -> features (N_patches / merge^2,
        out_hidden_size), and the DeepStack features, one such tensor per deepstack_visual_indexes block."""
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
        if self.position_grid:
            side = round(self.config.num_position_embeddings**0.5)
            indices, weights = (t.to(device) for t in position_grid_taps(grids, merge, side))  # (N, 4)
            x = x + (self.pos_embed(indices) * weights[..., None].to(x.dtype)).sum(1)
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
        deepstack = []
        for index, block in enumerate(self.blocks):
            full = not self.windowed or index in self.config.fullatt_block_indexes
            segments = per_frame if full else windows
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, segments, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments)
            if index in self.config.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[len(deepstack)](x))  # (N / merge^2, D_out)
        merged = self.merger(x)  # (N / merge^2, D_out)
        if self.windowed:  # (no Qwen2.5 checkpoint has DeepStack: config.py refuses it)
            merged = merged[torch.argsort(order)]  # back to the processor's token order
        return merged, deepstack
