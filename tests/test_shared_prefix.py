"""Shared-prefix training forwards (PrefixKV) against plain full forwards: same log-probs, same gradients.

GRPO re-scores G completions per prompt and SFT batches start with the same system prompt; both run the shared
part once. These tests check that this is exact: values and parameter gradients match a forward over the whole
sequences, with images in the prefix, left-padded prompts of different lengths and every model type (Qwen3-VL's
DeepStack included).
"""

import pytest
import torch

from vlaa_min.cache import KVCache
from vlaa_min.logprobs import completion_logprobs, masked_logprobs, sequence_logprobs, shared_prefix_length
from tests.test_generate import IMAGE, MIXED_PROMPTS, PAD, make_batch, make_model, positions

MODEL_TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        # A multi-threaded backward sums in another order: rounding grows with the gradient's largest entry.
        scale = max(1.0, float(b[name].abs().max()))
        torch.testing.assert_close(a[name], b[name], atol=atol * scale, rtol=1e-4, msg=name)


def random_completions(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMAGE + 2, 1024, (n, length), generator=generator)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    lengths[0] = length  # one row uses the whole width
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = PAD
    return ids, lengths


def full_forward_logprobs(model, batch, rows, completion_ids, lengths, temperature):
    """The reference: each completion appended to its own copy of its prompt, one forward over everything."""
    width = completion_ids.shape[1]
    completion_mask = torch.arange(width)[None, :] < lengths[:, None]
    input_ids = torch.cat([batch.input_ids[rows], completion_ids], dim=1)
    attention_mask = torch.cat([batch.attention_mask[rows], completion_mask], dim=1)
    has_image = (batch.input_ids == IMAGE).any(dim=1)
    pixel_values, image_grid_thw = None, None
    if batch.image_grid_thw is not None:  # the images of `rows`, in row order
        per_image = batch.pixel_values.split(batch.image_grid_thw.prod(dim=1).tolist())
        image_of_row = torch.cumsum(has_image.long(), 0) - 1
        chosen = [int(image_of_row[r]) for r in rows.tolist() if has_image[r]]
        pixel_values = torch.cat([per_image[i] for i in chosen])
        image_grid_thw = batch.image_grid_thw[chosen]
    hidden = model(input_ids, positions(input_ids, attention_mask, image_grid_thw), attention_mask, pixel_values,
                   image_grid_thw, return_hidden=True)
    target = torch.cat([torch.zeros_like(batch.attention_mask[rows]), completion_mask], dim=1)
    logp, _ = sequence_logprobs(hidden, input_ids, target, model.lm_head, temperature)
    return logp[:, batch.input_ids.shape[1] :]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_completion_logprobs_equal_full_forward_values_and_gradients(model_type):
    model = make_model(model_type).train()
    # 3 prompts: two images of different sizes, one text only
    batch = make_batch(MIXED_PROMPTS, seed=1, patch_size=model.config.vision.patch_size)
    rows = torch.tensor([2, 0, 0, 1, 2, 0, 1])  # several completions per prompt, in any order
    completion_ids, lengths = random_completions(len(rows), 6, seed=2)
    weights = torch.randn(len(rows), 6, generator=torch.Generator().manual_seed(3))  # a generic loss

    expected = full_forward_logprobs(model, batch, rows, completion_ids, lengths, temperature=0.8)
    (expected * weights).sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    logp, entropy = completion_logprobs(model, batch, completion_ids, lengths, temperature=0.8, with_entropy=True,
                                        prompt_rows=rows)
    (logp * weights).sum().backward()

    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert (logp[torch.arange(6)[None, :] >= lengths[:, None]] == 0).all()
    assert (entropy > 0)[torch.arange(6)[None, :] < lengths[:, None]].all()
    assert_same_grads(grads(model), expected_grads)  # the vision tower's included: it ran once per prompt


def test_completion_logprobs_default_rows_and_gradient_checkpointing():
    model = make_model().train()
    batch = make_batch(MIXED_PROMPTS, seed=4)
    completion_ids, lengths = random_completions(3, 5, seed=5)
    expected = full_forward_logprobs(model, batch, torch.arange(3), completion_ids, lengths, temperature=1.0)
    expected.sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    model.gradient_checkpointing = True
    logp, _ = completion_logprobs(model, batch, completion_ids, lengths)
    logp.sum().backward()
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads(model), expected_grads)


def sft_like_batch(seed: int, patch_size: int = 14):
    """Right-padded rows that share 9 leading text tokens, then an image, then text with a scored tail."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randint(IMAGE + 2, 1024, (9,), generator=generator).tolist()
    rows, lengths = [], [6, 9, 4]
    for length in lengths:
        own = torch.randint(IMAGE + 2, 1024, (length,), generator=generator).tolist()
        rows.append(shared + [2] + [IMAGE] * 4 + [3] + own)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    attention_mask = input_ids != PAD
    target_mask = attention_mask.clone()
    target_mask[:, :16] = False  # score the tail of each row
    image_grid_thw = torch.tensor([[1, 4, 4]] * len(rows))
    pixel_values = torch.randn(len(rows) * 16, 3 * 2 * patch_size**2, generator=generator)
    return input_ids, positions(input_ids, attention_mask, image_grid_thw), attention_mask, target_mask, \
        pixel_values, image_grid_thw


def test_shared_prefix_length_stops_at_differences_images_and_targets():
    input_ids, position_ids, attention_mask, target_mask, _, _ = sft_like_batch(seed=6)
    # 9 shared text tokens and a <|vision_start|>; the image placeholders (same id, other pixels) are not shared.
    assert shared_prefix_length(input_ids, position_ids, attention_mask, target_mask, IMAGE) == 10
    early_target = target_mask.clone()
    early_target[1, 5] = True  # token 5 is predicted by hidden state 4: the prefix must stop before it
    assert shared_prefix_length(input_ids, position_ids, attention_mask, early_target, IMAGE) == 4
    other = input_ids.clone()
    other[2, 3] += 1
    assert shared_prefix_length(other, position_ids, attention_mask, target_mask, IMAGE) == 3


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_masked_logprobs_equal_plain_forward_values_and_gradients(model_type):
    model = make_model(model_type).train()
    input_ids, position_ids, attention_mask, target_mask, pixel_values, image_grid_thw = sft_like_batch(
        seed=7, patch_size=model.config.vision.patch_size)

    hidden = model(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, return_hidden=True)
    expected, _ = sequence_logprobs(hidden, input_ids, target_mask, model.lm_head)
    expected.sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    logp = masked_logprobs(model, input_ids, position_ids, attention_mask, target_mask, pixel_values, image_grid_thw)
    logp.sum().backward()
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert (logp[~target_mask] == 0).all()
    assert_same_grads(grads(model), expected_grads)


def test_misused_pasts_are_refused():
    """A past the model cannot use is a ValueError that names it: not a past at all, a cache without the slots
    of the new tokens, a prefix with another number of rows than the batch."""
    model = make_model()
    batch = make_batch([(6, None)])
    last_ids, last_positions = batch.input_ids[:, -1:], batch.position_ids[:, :, -1:]
    prefix = model.encode_prefix(batch.input_ids[:, :-1], batch.position_ids[:, :, :-1])
    with pytest.raises(ValueError, match="past must be"):
        model(last_ids, last_positions, past=prefix.layers)
    with pytest.raises(ValueError, match="cache_position"):
        model(last_ids, last_positions, past=KVCache.for_model(model, 1, 8))
    with pytest.raises(ValueError, match="rows"):
        model(last_ids.repeat(2, 1), last_positions.repeat(1, 2, 1), past=prefix)
