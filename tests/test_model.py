"""Parity of vlaa_min's Qwen2-VL / Qwen2.5-VL (model.py, rope.py, checkpoint.py) with transformers.

Tiny random models in fp32 on CPU. Weights travel only through save_pretrained/from_pretrained
(ours -> transformers and transformers -> ours), never through a name map written here. Weights are
re-drawn with std 0.1 (not the 0.02 init) so that attention is far from uniform and a wrong
position, window or mask shows up in the logits (test_wrong_positions_are_detected checks that).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlaa_min.cache import GroupedKVCache, KVCache, attention_mask_4d
from vlaa_min.config import ModelConfig
from vlaa_min.infra.checkpoint import atomic_directory, load_state_dict, save_state_dict
from vlaa_min.model import VLModel, _hf_to_ours
from vlaa_min.rope import mrope_position_ids, next_position_ids
from tests.helpers import randomize_

TOL = 1e-4
PAD, EOS, VISION_START, VISION_END, IMAGE, VIDEO = 0, 1, 2, 3, 4, 5  # ModelConfig.tiny's default ids
VOCAB = 1024
HF_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
MODEL_TYPES = list(HF_CLASSES)


# --------------------------------------------------------------------------- helpers


def hf_config(model_type: str, tie: bool):
    """The tiny config written independently in transformers' own terms (mirrors ModelConfig.tiny)."""
    text = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
        bos_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD,
    )
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=tie)
    if model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, hidden_act="silu",
                      out_hidden_size=128, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_size=128)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def images(*sizes):
    """Random RGB images (height, width) -> (pixel_values, image_grid_thw) from transformers' processor."""
    rng = np.random.default_rng(sum(h * w for h, w in sizes))
    pil = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out = Qwen2VLImageProcessorPil()(images=pil, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def prompt(n_image_tokens: list[int], n_text: int, seed: int) -> list[int]:
    """Text, then each image as <|vision_start|> <|image_pad|>*n <|vision_end|> followed by text."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, VOCAB, n).tolist()  # noqa: E731
    ids = words(n_text)
    for n in n_image_tokens:
        ids += [VISION_START] + [IMAGE] * n + [VISION_END] + words(n_text)
    return ids


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = True
    return input_ids, mask


def image_tokens(grid_thw: torch.Tensor) -> list[int]:
    return (grid_thw.prod(-1) // 4).tolist()


def make_case(name: str):
    """(input_ids, attention_mask, pixel_values | None, image_grid_thw | None)."""
    if name == "text_only":
        input_ids, mask = left_pad([prompt([], 12, seed=1)])
        return input_ids, mask, None, None
    if name == "one_image":
        pixels, grid = images((112, 112))
        input_ids, mask = left_pad([prompt(image_tokens(grid), 5, seed=2)])
        return input_ids, mask, pixels, grid
    if name == "two_images_one_sample":
        pixels, grid = images((112, 112), (84, 140))
        input_ids, mask = left_pad([prompt(image_tokens(grid), 4, seed=3)])
        return input_ids, mask, pixels, grid
    if name == "left_padded_with_images":
        pixels, grid = images((140, 84), (56, 112))
        n = image_tokens(grid)
        rows = [prompt([n[0]], 7, seed=4), prompt([], 5, seed=5), prompt([n[1]], 2, seed=6)]
        input_ids, mask = left_pad(rows)
        return input_ids, mask, pixels, grid
    if name == "left_padded_text_only":
        input_ids, mask = left_pad([prompt([], 9, seed=7), prompt([], 3, seed=8), prompt([], 14, seed=9)])
        return input_ids, mask, None, None
    raise KeyError(name)


CASES = ["text_only", "one_image", "two_images_one_sample", "left_padded_with_images", "left_padded_text_only"]


def our_positions(input_ids, mask, grid):
    return mrope_position_ids(input_ids, mask, grid, image_token_id=IMAGE, spatial_merge_size=2)


def our_logits(model, input_ids, mask, pixels, grid):
    with torch.no_grad():
        return model(input_ids, our_positions(input_ids, mask, grid), mask, pixels, grid)


def hf_logits(model, input_ids, mask, pixels, grid):
    """transformers computes its own MRoPE positions from input ids + grids (mm_token_type_ids)."""
    token_types = (input_ids == IMAGE).int()
    kwargs = dict(input_ids=input_ids, attention_mask=mask.long(), mm_token_type_ids=token_types)
    if pixels is not None:
        kwargs.update(pixel_values=pixels, image_grid_thw=grid)
    elif not bool(mask.all()):
        # Text only: transformers' forward would number padding too (arange); its get_rope_index skips it.
        kwargs["position_ids"], _ = model.model.get_rope_index(input_ids, token_types, attention_mask=mask.long())
    with torch.no_grad():
        return model(**kwargs).logits


def max_diff_on_real_tokens(a, b, mask):
    return (a - b)[mask].abs().max().item()


@pytest.fixture(scope="module", params=MODEL_TYPES)
def pair(request, tmp_path_factory):
    """(ours, transformers) with identical weights: ours -> save_pretrained -> transformers from_pretrained."""
    model_type = request.param
    ours = VLModel(ModelConfig.tiny(model_type)).eval()
    randomize_(ours, seed=0)
    path = tmp_path_factory.mktemp(model_type)
    ours.save_pretrained(path)
    hf, info = HF_CLASSES[model_type].from_pretrained(path, attn_implementation="sdpa", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return ours, hf.eval()


# --------------------------------------------------------------------------- rope.py


@pytest.mark.parametrize("case", ["two_images_one_sample", "left_padded_with_images", "left_padded_text_only"])
def test_rope_matches_transformers_get_rope_index(pair, case):
    _, hf = pair
    input_ids, mask, _, grid = make_case(case)
    ours = our_positions(input_ids, mask, grid)
    theirs, _ = hf.model.get_rope_index(input_ids, (input_ids == IMAGE).int(), image_grid_thw=grid,
                                        attention_mask=mask.long())
    assert ours.shape == (3, *input_ids.shape)
    assert torch.equal(ours[:, mask], theirs[:, mask])
    assert bool((ours[:, ~mask] == 1).all())  # padding convention


def test_rope_image_layout_from_first_principles():
    # text(2) | image grid (1, 4, 6) -> merged 2 x 3 | text(2)
    input_ids = torch.tensor([[7, 8] + [IMAGE] * 6 + [9, 9]])
    positions = our_positions(input_ids, None, torch.tensor([[1, 4, 6]]))
    expected_t = [0, 1] + [2] * 6 + [5, 6]  # text after the image: max(2+0, 2+1, 2+2) + 1
    expected_h = [0, 1] + [2, 2, 2, 3, 3, 3] + [5, 6]
    expected_w = [0, 1] + [2, 3, 4, 2, 3, 4] + [5, 6]
    assert positions[:, 0].tolist() == [expected_t, expected_h, expected_w]


def test_next_position_ids_continues_the_sequence():
    input_ids, mask, _, grid = make_case("left_padded_with_images")
    positions = our_positions(input_ids, mask, grid)
    # Append one real text token to every row and recompute from scratch: it must sit at next_position_ids.
    extended_ids = torch.cat([input_ids, torch.full((input_ids.shape[0], 1), 42)], dim=1)
    extended_mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool)], dim=1)
    extended = our_positions(extended_ids, extended_mask, grid)
    expected = next_position_ids(positions, mask)
    assert expected.shape == (input_ids.shape[0],)
    for axis in range(3):
        assert torch.equal(extended[axis, :, -1], expected)


def test_rope_errors_name_the_problem():
    input_ids = torch.tensor([[7] + [IMAGE] * 3 + [8]])
    with pytest.raises(ValueError, match="needs 4"):
        our_positions(input_ids, None, torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="more than"):
        our_positions(torch.tensor([[7, 8]]), None, torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs"):
        our_positions(input_ids, None, None)


# --------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(pair, case):
    ours, hf = pair
    input_ids, mask, pixels, grid = make_case(case)
    a = our_logits(ours, input_ids, mask, pixels, grid)
    b = hf_logits(hf, input_ids, mask, pixels, grid)
    assert a.shape == (*input_ids.shape, VOCAB)
    assert max_diff_on_real_tokens(a, b, mask) <= TOL


def test_wrong_positions_are_detected(pair):
    # Guards the parity tests: 1-D text positions for image tokens must move the logits well past TOL.
    ours, hf = pair
    input_ids, mask, pixels, grid = make_case("one_image")
    flat = torch.arange(input_ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        wrong = ours(input_ids, flat, mask, pixels, grid)
    assert max_diff_on_real_tokens(wrong, hf_logits(hf, input_ids, mask, pixels, grid), mask) > 100 * TOL


def test_return_hidden_then_lm_head_equals_logits(pair):
    ours, _ = pair
    input_ids, mask, pixels, grid = make_case("one_image")
    positions = our_positions(input_ids, mask, grid)
    with torch.no_grad():
        hidden = ours(input_ids, positions, mask, pixels, grid, return_hidden=True)
        logits = ours(input_ids, positions, mask, pixels, grid)
        assert hidden.shape == (*input_ids.shape, 128)
        assert torch.allclose(ours.lm_head(hidden), logits, atol=1e-6)


def test_encode_images_matches_transformers(pair):
    ours, hf = pair
    pixels, grid = images((112, 168), (84, 84))
    with torch.no_grad():
        a, deepstack = ours.encode_images(pixels, grid)
        b = torch.cat(hf.model.get_image_features(pixels, grid).pooler_output)
    assert deepstack == []
    assert a.shape == (sum(image_tokens(grid)), 128)
    assert (a - b).abs().max().item() <= TOL


def test_image_token_count_mismatch_is_an_error(pair):
    ours, _ = pair
    input_ids, mask, pixels, grid = make_case("one_image")
    short = input_ids[:, 1:]
    positions = torch.zeros(3, *short.shape, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match="<\\|image_pad\\|>"):
        ours(torch.where(short == IMAGE, 77, short), positions, None, pixels, grid)


# --------------------------------------------------------------------------- checkpoints and configs


@pytest.mark.parametrize(
    "model_type,tie,shard",
    [("qwen2_5_vl", True, False), ("qwen2_5_vl", False, True), ("qwen2_vl", False, False), ("qwen2_vl", True, True)],
)
def test_transformers_checkpoint_loads_into_ours(tmp_path, model_type, tie, shard):
    torch.manual_seed(0)
    hf = HF_CLASSES[model_type](hf_config(model_type, tie)).eval()
    randomize_(hf, seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="200KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = VLModel.from_pretrained(tmp_path).eval()
    assert ours.config == ModelConfig.tiny(model_type, tie_word_embeddings=tie)
    assert (ours.lm_head.weight is ours.language_model.embed_tokens.weight) == tie
    for case in ["one_image", "left_padded_with_images"]:
        input_ids, mask, pixels, grid = make_case(case)
        a = our_logits(ours, input_ids, mask, pixels, grid)
        assert max_diff_on_real_tokens(a, hf_logits(hf, input_ids, mask, pixels, grid), mask) <= TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ours_untied_sharded_save_loads_in_transformers(tmp_path, model_type):
    ours = VLModel(ModelConfig.tiny(model_type, tie_word_embeddings=False)).eval()
    randomize_(ours, seed=2)
    ours.save_pretrained(tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" in index["weight_map"]
    hf, info = HF_CLASSES[model_type].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not hf.config.tie_word_embeddings
    input_ids, mask, pixels, grid = make_case("two_images_one_sample")
    a = our_logits(ours, input_ids, mask, pixels, grid)
    assert max_diff_on_real_tokens(a, hf_logits(hf.eval(), input_ids, mask, pixels, grid), mask) <= TOL
    # And back: transformers' save of those weights reloads into exactly our tensors.
    hf.save_pretrained(tmp_path / "back")
    again = VLModel.from_pretrained(tmp_path / "back")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_tied_save_omits_lm_head(tmp_path, pair):
    ours, hf = pair
    ours.save_pretrained(tmp_path)
    names = load_state_dict(tmp_path).keys()
    assert ours.config.tie_word_embeddings and "lm_head.weight" not in names
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_transformers5_tensor_names_load(tmp_path, model_type):
    # transformers' in-memory names (model.language_model.*, model.visual.*) are the v5 checkpoint layout.
    hf = HF_CLASSES[model_type](hf_config(model_type, tie=False)).eval()
    randomize_(hf, seed=3)
    hf.config.save_pretrained(tmp_path)
    state = {name: t.contiguous() for name, t in hf.state_dict().items()}
    assert any(name.startswith("model.language_model.") for name in state)
    save_file(state, tmp_path / "model.safetensors")
    ours = VLModel.from_pretrained(tmp_path).eval()
    input_ids, mask, pixels, grid = make_case("one_image")
    a = our_logits(ours, input_ids, mask, pixels, grid)
    assert max_diff_on_real_tokens(a, hf_logits(hf, input_ids, mask, pixels, grid), mask) <= TOL


def legacy_flat_config(model_type: str) -> dict:
    """A config.json in the hub's released layout (flat text fields, rope_scaling, torch_dtype)."""
    d = dict(
        architectures=[HF_CLASSES[model_type].__name__], model_type=model_type, vocab_size=VOCAB, hidden_size=128,
        intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, max_window_layers=4,
        sliding_window=4096, use_sliding_window=False, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        bos_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, vision_token_id=6,
        tie_word_embeddings=True, torch_dtype="float32",
    )
    if model_type == "qwen2_5_vl":
        d["vision_config"] = dict(depth=2, hidden_act="silu", hidden_size=64, intermediate_size=128, num_heads=4,
                                  in_chans=3, out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                                  spatial_patch_size=14, window_size=56, fullatt_block_indexes=[1],
                                  tokens_per_second=2, temporal_patch_size=2)
    else:
        d["vision_config"] = dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, in_chans=3, hidden_size=128,
                                  patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                                  temporal_patch_size=2)
    return d


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_layouts(model_type):
    tiny = ModelConfig.tiny(model_type)
    legacy = legacy_flat_config(model_type)
    config_class = type(hf_config(model_type, True))
    # Legacy flat file, read by us directly and through transformers' nested re-save, gives the tiny config.
    assert ModelConfig.from_hf_dict(legacy) == tiny
    assert ModelConfig.from_hf_dict(config_class.from_dict(legacy).to_dict()) == tiny
    # Our nested file loads in transformers unchanged, with the same values.
    theirs = config_class.from_dict(tiny.to_hf_dict())
    text, vision = theirs.text_config, theirs.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (128, 4, 2, VOCAB)
    assert text.rope_parameters["mrope_section"] == [4, 6, 6] and text.rope_parameters["rope_theta"] == 1e6
    assert (theirs.image_token_id, theirs.vision_start_token_id, theirs.tie_word_embeddings) == (IMAGE, 2, True)
    assert vision.depth == 2 and vision.spatial_merge_size == 2
    assert ModelConfig.from_hf_dict(theirs.to_dict()) == tiny


def test_tiny_overrides_and_errors():
    config = ModelConfig.tiny(text_num_hidden_layers=2, vision_depth=1, tie_word_embeddings=False)
    assert (config.text.num_hidden_layers, config.vision.depth, config.tie_word_embeddings) == (2, 1, False)
    with pytest.raises(TypeError, match="unknown override"):
        ModelConfig.tiny(text_no_such_field=1)
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig.tiny(text_mrope_section=[4, 4, 4])
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict({"model_type": "llama"})


# --------------------------------------------------------------------------- KV cache


def test_cached_forward_matches_uncached(pair):
    ours, _ = pair
    # Left-padded prompts (with and without an image), then 4 more real tokens per row.
    pixels, grid = images((112, 84))
    prompt_ids, prompt_mask = left_pad([prompt(image_tokens(grid), 3, seed=10), prompt([], 6, seed=11)])
    continuation = torch.randint(10, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([prompt_ids, continuation], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(continuation, dtype=torch.bool)], dim=1)
    positions = our_positions(input_ids, mask, grid)
    with torch.no_grad():
        full = ours(input_ids, positions, mask, pixels, grid)  # (B, T, V)
        prompt_len = prompt_ids.shape[1]
        cache = KVCache.for_model(ours, batch_size=2, max_len=input_ids.shape[1] + 3)  # spare slots stay invalid
        prefill = ours(prompt_ids, positions[:, :, :prompt_len], prompt_mask, pixels, grid,
                       past=cache, cache_position=torch.arange(prompt_len))
        steps = [prefill]
        for t in range(prompt_len, input_ids.shape[1]):
            step = ours(input_ids[:, t : t + 1], positions[:, :, t : t + 1], mask[:, t : t + 1],
                        past=cache, cache_position=torch.tensor([t]))
            steps.append(step)
    cached = torch.cat(steps, dim=1)
    assert max_diff_on_real_tokens(cached, full, mask) <= TOL
    assert torch.isfinite(cached).all()  # padding query rows too
    # Every query row (padding ones included) keeps at least one key: no softmax over nothing.
    key_slots = torch.arange(cache.max_len)
    assert attention_mask_4d(cache.valid, torch.arange(input_ids.shape[1]), key_slots).any(-1).all()
    assert torch.equal(cache.valid[:, : input_ids.shape[1]], mask) and not cache.valid[:, input_ids.shape[1] :].any()


def test_grouped_cache_decode_equals_full_forward(pair):
    """G samples per prompt decoding over one shared copy of each prompt's cache give the logits of full
    forwards over each row's own prompt + tokens (prompts of different lengths, one with an image)."""
    ours, _ = pair
    group, steps = 3, 3
    pixels, grid = images((112, 84))
    prompt_ids, prompt_mask = left_pad([prompt(image_tokens(grid), 3, seed=14), prompt([], 6, seed=15)])
    prompt_len = prompt_ids.shape[1]
    tokens = torch.randint(10, VOCAB, (2 * group, steps), generator=torch.Generator().manual_seed(1))  # (N, steps)
    rows_prompt_ids = prompt_ids.repeat_interleave(group, 0)
    rows_mask = prompt_mask.repeat_interleave(group, 0)
    input_ids = torch.cat([rows_prompt_ids, tokens], dim=1)
    mask = torch.cat([rows_mask, torch.ones_like(tokens, dtype=torch.bool)], dim=1)
    rows_pixels = torch.cat([pixels] * group)  # only prompt 0 has an image: its G rows come first
    rows_grid = grid.repeat(group, 1)
    positions = our_positions(input_ids, mask, rows_grid)
    with torch.no_grad():
        full = ours(input_ids, positions, mask, rows_pixels, rows_grid)[:, prompt_len:]  # (N, steps, V)
        cache = KVCache.for_model(ours, batch_size=2, max_len=prompt_len)
        ours(prompt_ids, our_positions(prompt_ids, prompt_mask, grid), prompt_mask, pixels, grid, past=cache,
             cache_position=torch.arange(prompt_len))
        grouped = GroupedKVCache(cache, group, max_new_tokens=steps + 2)  # spare slots stay invalid
        cached = [
            ours(tokens[:, t : t + 1], positions[:, :, prompt_len + t : prompt_len + t + 1], None, past=grouped,
                 cache_position=torch.tensor([prompt_len + t]))
            for t in range(steps)
        ]
    assert (cached_logits := torch.cat(cached, dim=1)).shape == full.shape
    assert (cached_logits - full).abs().max() <= TOL
    assert grouped.valid[:, :steps].all() and not grouped.valid[:, steps:].any()


# --------------------------------------------------------------------------- training-side features


def gradients_without_and_with_checkpointing(model, input_ids, mask, pixels, grid) -> list[dict]:
    """Every parameter's gradient of one loss over the real tokens, from a plain and a recomputing backward."""
    model.train()
    positions = our_positions(input_ids, mask, grid)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(input_ids, positions, mask, pixels, grid).logsumexp(-1)[mask].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads


def test_gradient_checkpointing_gives_the_same_gradients():
    model = VLModel(ModelConfig.tiny(text_num_hidden_layers=2))
    randomize_(model, seed=4)
    grads = gradients_without_and_with_checkpointing(model, *make_case("one_image"))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_atomic_directory_replaces_or_leaves_untouched(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "one"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or backup left behind


def test_sharded_state_dict_round_trip(tmp_path):
    state = {f"w{i}": torch.randn(10, 25) for i in range(7)}  # 1000 bytes each
    files = save_state_dict(state, tmp_path, max_shard_bytes=2500)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 4 and "model.safetensors.index.json" in files
    assert all(sum(t.numel() * 4 for t in load_file(tmp_path / f).values()) <= 2500 for f in shards)
    loaded = load_state_dict(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_state_dict(tmp_path / "missing")


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_real_widths_match_transformers_parameter_for_parameter(size):
    """ModelConfig.qwen2_5_vl builds the released checkpoints' tensors: same names and shapes as transformers
    builds from the same config.json (on the meta device, so full depth costs no memory)."""
    config = ModelConfig.qwen2_5_vl(size)
    with torch.device("meta"):
        ours = VLModel(config)
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config.to_hf_dict()))
    ours_shapes = {name: tuple(p.shape) for name, p in ours.state_dict().items()}
    hf_shapes = {_hf_to_ours(name): tuple(p.shape) for name, p in hf.state_dict().items()}
    if config.tie_word_embeddings:
        hf_shapes.pop("lm_head.weight", None)
        ours_shapes.pop("lm_head.weight", None)
    assert ours_shapes == hf_shapes
    billions = sum(p.numel() for p in ours.parameters()) / 1e9
    assert billions == pytest.approx({"3b": 3.75, "7b": 8.29}[size], abs=0.01)  # the hub's model cards: 3.75B, 8.29B


def test_real_widths_cut_to_a_cpu_size():
    config = ModelConfig.qwen2_5_vl("3b", layers=2, vision_depth=2)
    assert (config.text.num_hidden_layers, config.vision.depth, config.vision.fullatt_block_indexes) == (2, 2, [1])
    assert (config.text.vocab_size, config.text.head_dim, config.vision.out_hidden_size) == (151936, 128, 2048)
    with pytest.raises(ValueError, match="size must be one of"):
        ModelConfig.qwen2_5_vl("13b")
