"""3-D multimodal rotary position ids (MRoPE) for Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

Every token gets three position ids (temporal, height, width):
  * a text token gets the same running index on all three axes;
  * an image's tokens (one per 2x2-merged patch, laid out row by row) get
    (start + t, start + row, start + col) over the merged grid, where `start` is the
    position the next text token would have had;
  * the text after an image continues at max(all ids so far) + 1.
This is what transformers' `get_rope_index` computes for images (videos are not
supported: vlaa-min feeds still images only); Qwen3-VL's version, which continues at
start + max(h, w) / merge, gives the same ids for a one-frame image. Which frequencies
each axis rotates (blocks or interleaved) is the decoder's business (model.py). Padding positions get 1, as older
transformers releases did (5.x writes 0); they are masked out of attention either way.

Usage:
    position_ids = mrope_position_ids(input_ids, attention_mask, image_grid_thw,
                                      image_token_id=cfg.image_token_id,
                                      spatial_merge_size=cfg.vision.spatial_merge_size)  # (3, B, T)
    next_pos = next_position_ids(position_ids, attention_mask)  # (B,) for the first generated token
"""

import torch

PADDING_POSITION = 1


def _image_positions(grid_thw: list[int], merge: int, start: int) -> torch.Tensor:
    """Position ids (3, t*h*w/merge^2) of one image's tokens, offset by `start`."""
    t, h, w = grid_thw
    grid_t, grid_h, grid_w = torch.meshgrid(
        torch.arange(t), torch.arange(h // merge), torch.arange(w // merge), indexing="ij"
    )
    return torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + start


def _row_positions(ids: list[int], images: list[list[int]], image_token_id: int, merge: int, row: int) -> torch.Tensor:
    """Position ids (3, n) for one row's real tokens; `images` is consumed from the front."""
    pieces = []  # (3, k) chunks in order
    next_pos = 0
    i = 0
    while i < len(ids):
        if ids[i] != image_token_id:
            # A run of text tokens: one shared running index on all three axes.
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            pieces.append(torch.arange(next_pos, next_pos + j - i).expand(3, -1))
            next_pos += j - i
            i = j
            continue
        if not images:
            raise ValueError(
                f"mrope_position_ids: row {row} has more <|image_pad|> runs than image_grid_thw has images"
            )
        grid = images.pop(0)
        t, h, w = grid
        if h % merge or w % merge:
            raise ValueError(f"mrope_position_ids: image_grid_thw row {grid} is not divisible by merge size {merge}")
        n_tokens = t * h * w // (merge * merge)
        span = ids[i : i + n_tokens]
        if len(span) != n_tokens or any(tok != image_token_id for tok in span):
            run = 0
            while i + run < len(ids) and ids[i + run] == image_token_id:
                run += 1
            raise ValueError(
                f"mrope_position_ids: row {row} has an image run of {run} <|image_pad|> tokens at real-token "
                f"index {i}, but image_grid_thw {grid} needs {n_tokens} (t*h*w/{merge}^2)"
            )
        positions = _image_positions(grid, merge, next_pos)
        pieces.append(positions)
        next_pos = int(positions.max()) + 1
        i += n_tokens
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1)


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """MRoPE position ids (3, B, T) long for a batch; padding (attention_mask False) gets 1.

    input_ids (B, T) long; attention_mask (B, T) bool (True = real token, left or right padding);
    image_grid_thw (I, 3) patch grids of the images in order of appearance (row by row, left to right).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"mrope_position_ids: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"mrope_position_ids: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    images = [] if image_grid_thw is None else image_grid_thw.reshape(-1, 3).tolist()
    batch, length = input_ids.shape
    position_ids = torch.full((3, batch, length), PADDING_POSITION, dtype=torch.long)
    real = attention_mask.bool().cpu()
    ids_cpu = input_ids.cpu()
    for row in range(batch):
        row_ids = ids_cpu[row][real[row]].tolist()
        position_ids[:, row, real[row]] = _row_positions(row_ids, images, image_token_id, spatial_merge_size, row)
    if images:
        raise ValueError(
            f"mrope_position_ids: image_grid_thw has {len(images)} image(s) more than the <|image_pad|> runs "
            f"in input_ids"
        )
    return position_ids.to(input_ids.device)


def next_position_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position (B,) the next generated token takes: 1 + the largest id over the row's real tokens."""
    if attention_mask is None:
        return position_ids.amax(dim=(0, 2)) + 1
    # Padding ids are masked to -1 so they never win the max (an all-padding row gives 0).
    masked = position_ids.masked_fill(~attention_mask.bool().unsqueeze(0), -1)  # (3, B, T)
    return masked.amax(dim=(0, 2)) + 1
