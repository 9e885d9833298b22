"""Parity of vlaa_min's Qwen3-VL (the qwen3_vl family of model.py, vision.py, config.py) with transformers.

As tests/test_model.py does for Qwen2/2.5-VL, whose helpers these tests share: tiny random models in fp32 on CPU,
weights re-drawn with std 0.1, and weights that travel only through save_pretrained / from_pretrained. The tiny
Qwen3-VL config has what the released ones have: DeepStack (into decoder layers 0 and 1), interleaved MRoPE, a
head_dim that is not hidden_size / heads, and a learned position grid (4 x 4) that every image resamples.
Greedy generation and the shared-prefix log-probs of Qwen3-VL are in test_generate.py and test_shared_prefix.py.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlaa_min.config import ModelConfig
from vlaa_min.model import VLModel, _ours_to_hf
from tests.helpers import randomize_
from vlaa_min.infra.rehearsal import qwen3_vl_hub_config
from tests.test_model import (
    EOS, IMAGE, PAD, TOL, VIDEO, VISION_END, VISION_START, VOCAB, gradients_without_and_with_checkpointing, hf_logits,
    image_tokens, left_pad, max_diff_on_real_tokens, our_logits, our_positions, prompt,
)

QWEN3_MEAN_STD = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # Qwen3-VL's preprocessor_config.json


def hf_config(tie: bool = True) -> Qwen3VLConfig:
    """ModelConfig.tiny("qwen3_vl") written independently in transformers' own terms."""
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=48, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [10, 7, 7], "mrope_interleaved": True,
                                 "rope_theta": 5e6},
                bos_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD)
    vision = dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=128, hidden_act="gelu_pytorch_tanh",
                  out_hidden_size=128, patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                         vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def images(*sizes):
    """Random RGB images (height, width) -> (pixel_values, image_grid_thw) from transformers' processor, set up as
    Qwen3-VL's: 16-pixel patches (sides rounded to 32), mean and std 0.5."""
    rng = np.random.default_rng(sum(h * w for h, w in sizes))
    pil = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out = Qwen2VLImageProcessorPil(patch_size=16, **QWEN3_MEAN_STD)(images=pil, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def make_case(name: str):
    """(input_ids, attention_mask, pixel_values | None, image_grid_thw | None)."""
    if name == "left_padded_images_and_text":  # three aspect ratios, a text-only row in between
        pixels, grid = images((128, 96), (64, 160), (96, 96))
        n = image_tokens(grid)
        rows = [prompt([n[0]], 7, seed=4), prompt([], 5, seed=5), prompt([n[1], n[2]], 2, seed=6)]
        input_ids, mask = left_pad(rows)
        return input_ids, mask, pixels, grid
    if name == "left_padded_text_only":
        input_ids, mask = left_pad([prompt([], 9, seed=7), prompt([], 3, seed=8)])
        return input_ids, mask, None, None
    raise KeyError(name)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers) with identical weights: ours -> save_pretrained -> transformers from_pretrained."""
    ours = VLModel(ModelConfig.tiny("qwen3_vl")).eval()
    randomize_(ours, seed=0)
    path = tmp_path_factory.mktemp("qwen3_vl")
    ours.save_pretrained(path)
    hf, info = Qwen3VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa",
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return ours, hf.eval(), path


@pytest.mark.parametrize("case", ["left_padded_images_and_text", "left_padded_text_only"])
def test_logits_match_transformers(pair, case):
    ours, hf, _ = pair
    input_ids, mask, pixels, grid = make_case(case)
    a = our_logits(ours, input_ids, mask, pixels, grid)
    assert a.shape == (*input_ids.shape, VOCAB)
    assert max_diff_on_real_tokens(a, hf_logits(hf, input_ids, mask, pixels, grid), mask) <= TOL


def test_deepstack_and_interleaved_mrope_are_detected(pair):
    # Guards the parity test: without DeepStack, or with MRoPE in blocks, the logits move well past TOL.
    ours, hf, _ = pair
    input_ids, mask, pixels, grid = make_case("left_padded_images_and_text")
    reference = hf_logits(hf, input_ids, mask, pixels, grid)
    no_deepstack = VLModel(dataclasses.replace(ours.config, vision=dataclasses.replace(
        ours.config.vision, deepstack_visual_indexes=[]))).eval()
    no_deepstack.load_state_dict(ours.state_dict(), strict=False)  # all but the DeepStack mergers
    blocks = VLModel(dataclasses.replace(ours.config, text=dataclasses.replace(
        ours.config.text, mrope_interleaved=False))).eval()
    blocks.load_state_dict(ours.state_dict())
    for wrong in (no_deepstack, blocks):
        logits = our_logits(wrong, input_ids, mask, pixels, grid)
        assert max_diff_on_real_tokens(logits, reference, mask) > 100 * TOL


def test_rope_and_image_features_match_transformers(pair):
    ours, hf, _ = pair
    input_ids, mask, pixels, grid = make_case("left_padded_images_and_text")
    theirs, _ = hf.model.get_rope_index(input_ids, (input_ids == IMAGE).int(), image_grid_thw=grid,
                                        attention_mask=mask.long())
    assert torch.equal(our_positions(input_ids, mask, grid)[:, mask], theirs[:, mask])
    with torch.no_grad():
        features, deepstack = ours.encode_images(pixels, grid)
        reference = hf.model.get_image_features(pixels, grid)
    assert features.shape == (sum(image_tokens(grid)), 128) and len(deepstack) == 2
    assert (features - torch.cat(reference.pooler_output)).abs().max() <= TOL
    for ours_block, theirs_block in zip(deepstack, reference.deepstack_features, strict=True):
        assert (ours_block - torch.cat(theirs_block)).abs().max() <= TOL


def test_gradient_checkpointing_gives_the_same_gradients_with_deepstack():
    model = VLModel(ModelConfig.tiny("qwen3_vl", text_num_hidden_layers=2))
    randomize_(model, seed=4)
    grads = gradients_without_and_with_checkpointing(model, *make_case("left_padded_images_and_text"))
    assert grads[0]["visual.deepstack_merger_list.1.linear_fc2.weight"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------- checkpoints and configs


def test_our_checkpoint_has_the_hub_names(pair):
    _, _, path = pair
    names = load_file(path / "model.safetensors").keys()
    assert all(name.startswith(("model.language_model.", "model.visual.")) for name in names)
    assert "model.visual.deepstack_merger_list.1.linear_fc2.weight" in names
    assert "model.visual.pos_embed.weight" in names and "model.visual.patch_embed.proj.bias" in names
    assert "lm_head.weight" not in names  # tied
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen3VLForConditionalGeneration"]


@pytest.mark.parametrize("tie,shard", [(True, False), (False, True)])
def test_transformers_checkpoint_loads_into_ours(tmp_path, tie, shard):
    torch.manual_seed(0)
    hf = Qwen3VLForConditionalGeneration(hf_config(tie)).eval()
    randomize_(hf, seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="200KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = VLModel.from_pretrained(tmp_path).eval()
    assert ours.config == ModelConfig.tiny("qwen3_vl", tie_word_embeddings=tie)
    assert (ours.lm_head.weight is ours.language_model.embed_tokens.weight) == tie
    input_ids, mask, pixels, grid = make_case("left_padded_images_and_text")
    a = our_logits(ours, input_ids, mask, pixels, grid)
    assert max_diff_on_real_tokens(a, hf_logits(hf, input_ids, mask, pixels, grid), mask) <= TOL
    # And back: our save of those weights is transformers' file, tensor for tensor.
    ours.save_pretrained(tmp_path / "back")
    again = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def hub_config() -> dict:
    """The tiny config.json in the layout Qwen3-VL was released in (nested, rope_scaling in text_config)."""
    return qwen3_vl_hub_config(ModelConfig.tiny("qwen3_vl").to_hf_dict())


def test_config_layouts():
    tiny = ModelConfig.tiny("qwen3_vl")
    assert ModelConfig.from_hf_dict(hub_config()) == tiny
    assert ModelConfig.from_hf_dict(Qwen3VLConfig.from_dict(hub_config()).to_dict()) == tiny
    theirs = Qwen3VLConfig.from_dict(tiny.to_hf_dict())
    text, vision = theirs.text_config, theirs.vision_config
    assert (text.head_dim, text.attention_bias, text.rope_parameters["mrope_interleaved"]) == (48, False, True)
    assert (vision.deepstack_visual_indexes, vision.num_position_embeddings, vision.patch_size) == ([0, 1], 16, 16)
    assert ModelConfig.from_hf_dict(theirs.to_dict()) == tiny


def test_unsupported_relatives_stop_before_any_weight_is_read(tmp_path, pair):
    moe = hub_config() | {"model_type": "qwen3_vl_moe"}
    (tmp_path / "config.json").write_text(json.dumps(moe))  # and no weights at all
    with pytest.raises(ValueError, match="Qwen3-VL-MoE"):
        VLModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf_dict(hub_config() | {"text_config": hub_config()["text_config"] | {
            "rope_scaling": {"rope_type": "yarn", "mrope_section": [10, 7, 7]}}})
    with pytest.raises(ValueError, match="DeepStack"):
        ModelConfig.tiny("qwen2_5_vl", vision_deepstack_visual_indexes=[0])
    ours, _, _ = pair
    input_ids = torch.tensor([[7, VISION_START, VIDEO, VIDEO, VISION_END, 8]])
    with torch.no_grad(), pytest.raises(ValueError, match="video input is not supported"):
        ours(input_ids, our_positions(input_ids, None, None))


# --------------------------------------------------------------------------- real widths


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
def test_real_widths_match_transformers_parameter_for_parameter(size):
    """ModelConfig.qwen3_vl builds the same tensor names and shapes as transformers builds from the same
    config.json (on the meta device), and so the same parameter count."""
    config = ModelConfig.qwen3_vl(size)
    with torch.device("meta"):
        ours = VLModel(config)
        hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config.to_hf_dict()))
    ours_shapes = {_ours_to_hf(name, config.family): tuple(p.shape) for name, p in ours.state_dict().items()}
    hf_shapes = {name: tuple(p.shape) for name, p in hf.state_dict().items()}
    assert ours_shapes == hf_shapes
    ours_count, hf_count = (sum(p.numel() for p in model.parameters()) for model in (ours, hf))
    assert ours_count == hf_count
    assert ours_count / 1e9 == pytest.approx({"2b": 2.13, "4b": 4.44, "8b": 8.77}[size], abs=0.01)  # model cards


@pytest.mark.slow  # ~11 s on 2 cores: initialising and writing 460 MB of fp32 weights
def test_real_width_layers_match_transformers(tmp_path):
    """Qwen3-VL-4B's widths (hidden 2560, 32 heads of 128, the 1024-wide tower): one decoder layer (with DeepStack)
    and 2 vision blocks, Qwen's 0.02 init; the vocabulary is cut (it sets no layer's width) to keep the test small."""
    real = ModelConfig.qwen3_vl("4b", layers=1, vision_depth=2)
    text = dataclasses.replace(real.text, vocab_size=VOCAB)
    config = dataclasses.replace(ModelConfig.tiny("qwen3_vl"), text=text, vision=real.vision)
    assert text.head_dim * text.num_attention_heads != text.hidden_size
    torch.manual_seed(0)
    ours = VLModel(config).eval()
    ours.save_pretrained(tmp_path)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    pixels, grid = images((96, 128))
    input_ids, mask = left_pad([prompt(image_tokens(grid), 4, seed=1), prompt([], 6, seed=2)])
    a = our_logits(ours, input_ids, mask, pixels, grid)
    assert max_diff_on_real_tokens(a, hf_logits(hf, input_ids, mask, pixels, grid), mask) <= TOL
