"""Tests for vlaa_min/tokenizer.py and vlaa_min/processor.py.

Image preprocessing and smart_resize are compared with transformers' Qwen2-VL processor; the
prompt with our tokenizer's chat template, and a Qwen3-VL prompt with Qwen's real tokenizer and transformers' own
processing; token-level facts (pad counts, loss mask, padding) are recomputed here from their definitions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from vlaa_min.infra.rehearsal import QWEN3_VL_PREPROCESSOR_CONFIG, reference_prompt, write_tokenizer
from vlaa_min.processor import SYSTEM_PROMPT, ImageProcessor, Processor, smart_resize
from vlaa_min.rope import mrope_position_ids
from vlaa_min.tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_PAD,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    build_tokenizer,
    special_token_ids,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_TEXTS = [
    SYSTEM_PROMPT,
    "How many red circles are in the image?",
    "<think> There are 3 red circles and 2 blue squares, so the answer is 3. </think> <answer>3</answer>",
    "Which option is correct? A) 12 B) 15 C) 18 D) 21",
    "Give the bounding box [x1, y1, x2, y2] of the green triangle.",
] * 4
UNICODE_TEXTS = [
    SYSTEM_PROMPT,
    "héllo wörld — naïve café 🤔🧠👩‍👩‍👧 日本語のテキスト مرحبا",
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # comment\r\n",
    "  leading and trailing spaces  \n\n\n",
    "<think> a </think><answer>B</answer>",
    "\x00\x1f control bytes and a lone surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TRAINING_TEXTS, vocab_size=512)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Processor(tokenizer)


def random_image(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def expanded_template_text(processor, text, encoded_images):
    """The chat-template text with each <|image_pad|> repeated once per merged patch."""
    pieces = text.split(IMAGE_PAD)
    assert len(pieces) == len(encoded_images) + 1
    out = pieces[0]
    for (_, grid_thw), piece in zip(encoded_images, pieces[1:]):
        out += IMAGE_PAD * (int(grid_thw.prod()) // processor.image_processor.merge_size**2) + piece
    return out


# --- smart_resize and the image processor --------------------------------------------------


SIDES = [1, 2, 13, 14, 27, 28, 41, 42, 55, 56, 70, 99, 100, 333, 1000, 4000]
PIXEL_LIMITS = [(56 * 56, 28 * 28 * 1280), (28 * 28, 28 * 28 * 4), (112 * 112, 224 * 224), (56 * 56, 12845056)]


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_LIMITS)
def test_smart_resize_matches_transformers(min_pixels, max_pixels):
    for height in SIDES:
        for width in SIDES:
            if max(height, width) / min(height, width) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(height, width, 28, min_pixels, max_pixels)
                continue
            ours = smart_resize(height, width, 28, min_pixels, max_pixels)
            assert ours == reference_smart_resize(height, width, 28, min_pixels, max_pixels), (height, width)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0


def test_smart_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


IMAGE_SIZES = [(5, 7), (28, 28), (123, 457), (50, 1400), (1200, 900)]


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_LIMITS[:3])
@pytest.mark.parametrize("height,width", IMAGE_SIZES)
def test_image_processor_matches_transformers(height, width, min_pixels, max_pixels):
    image = random_image(height, width, seed=height * 7 + width)
    ours = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    pixel_values, grid_thw = ours(image)
    reference = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    expected = reference(images=[image], return_tensors="pt")
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=1e-5, rtol=1e-5)
    assert grid_thw.tolist() == expected["image_grid_thw"][0].tolist()
    assert pixel_values.shape == (int(grid_thw.prod()), ours.patch_dim)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_image_processor_converts_modes_like_transformers(mode):
    image = random_image(61, 83, seed=5, mode=mode)
    pixel_values, _ = ImageProcessor()(image)
    expected = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=1e-5)


def test_image_processor_config_round_trip():
    theirs = Qwen2VLImageProcessorPil(size={"shortest_edge": 1000, "longest_edge": 5000}).to_dict()
    assert ImageProcessor.from_dict(theirs) == ImageProcessor(min_pixels=1000, max_pixels=5000)
    # Qwen's older files name the limits at the top level, and those win over "size".
    legacy = {"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 1, "longest_edge": 2}}
    assert ImageProcessor.from_dict(legacy) == ImageProcessor(min_pixels=3136, max_pixels=12845056)
    size_with_old_names = {"size": {"min_pixels": 100, "max_pixels": 1000}}
    assert ImageProcessor.from_dict(size_with_old_names) == ImageProcessor(min_pixels=100, max_pixels=1000)
    ours = ImageProcessor(min_pixels=2000, max_pixels=9000, merge_size=2)
    assert ImageProcessor.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


def test_image_processor_config_errors_name_the_field():
    with pytest.raises(ValueError, match="my.json.*patch_size"):
        ImageProcessor.from_dict({"patch_size": "14"}, source="my.json")
    with pytest.raises(ValueError, match="image_mean"):
        ImageProcessor.from_dict({"image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessor.from_dict({"do_normalize": False})


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_special_and_tag_tokens(tokenizer):
    assert len(tokenizer) <= 512
    for token in SPECIAL_TOKENS + TAG_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    ids = special_token_ids(tokenizer)
    assert len(set(ids.values())) == len(ids)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<|im_start|>assistant\n<think> 2+2 </think> <answer>4</answer><|im_end|><|endoftext|>"
    decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert decoded == "assistant\n<think> 2+2 </think> <answer>4</answer>"


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_is_deterministic(tokenizer):
    again = build_tokenizer(TRAINING_TEXTS, vocab_size=512)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    # A fresh interpreter (another hash seed) must learn the same merges too.
    script = (
        "import json, sys; from vlaa_min.tokenizer import build_tokenizer; "
        "texts = json.load(sys.stdin); "
        "sys.stdout.write(build_tokenizer(texts, vocab_size=512).backend_tokenizer.to_str())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(TRAINING_TEXTS),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert result.stdout == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(TRAINING_TEXTS, vocab_size=200)


def test_saved_tokenizer_reloads_through_autotokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in UNICODE_TEXTS + TRAINING_TEXTS[:5]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert reloaded.encode(text, add_special_tokens=False) == ids
        assert reloaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert special_token_ids(reloaded) == special_token_ids(tokenizer)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert len(reloaded) == len(tokenizer)


# --- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prompt_text_matches_chat_template(processor, tokenizer, num_images):
    question = "How many red circles are there?"
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert processor.prompt_text(question, num_images) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    # Without a system turn the template supplies Qwen's default one; system=None does the same.
    default = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
    assert processor.prompt_text(question, num_images, system=None) == default


def test_encode_prompt_expands_image_pads(processor, tokenizer):
    images = [random_image(123, 457, seed=1), random_image(60, 60, seed=2)]
    encoded = processor.encode_prompt("Compare the two images.", images)
    assert encoded.image_grid_thw.shape == (2, 3)
    pad_count = encoded.input_ids.count(processor.image_token_id)
    assert pad_count == int(encoded.image_grid_thw.prod(dim=1).sum()) // 4
    assert encoded.pixel_values.shape[0] == int(encoded.image_grid_thw.prod(dim=1).sum())
    # Same ids as transformers' route: expand the placeholder in the text, then tokenise.
    per_image = [processor.image_processor(image) for image in images]
    text = expanded_template_text(processor, processor.prompt_text("Compare the two images.", 2), per_image)
    assert encoded.input_ids == tokenizer.encode(text, add_special_tokens=False)
    torch.testing.assert_close(encoded.pixel_values, torch.cat([pixels for pixels, _ in per_image]))


def test_encode_prompt_without_image(processor, tokenizer):
    encoded = processor.encode_prompt("What is 2 + 3?", [])
    assert encoded.pixel_values is None and encoded.image_grid_thw is None
    assert processor.image_token_id not in encoded.input_ids
    assert encoded.input_ids == tokenizer.encode(processor.prompt_text("What is 2 + 3?", 0), add_special_tokens=False)


def test_encode_prompt_too_long_is_an_error(processor):
    image = random_image(100, 100)
    length = len(processor.encode_prompt("How many?", [image]).input_ids)
    assert len(processor.encode_prompt("How many?", [image], max_length=length).input_ids) == length
    with pytest.raises(ValueError, match="max_length"):
        processor.encode_prompt("How many?", [image], max_length=length - 1)


def test_encode_prompt_rejects_image_pad_in_question(processor):
    with pytest.raises(ValueError, match="image_pad"):
        processor.encode_prompt(f"sneaky {IMAGE_PAD} text", [random_image(56, 56)])


# --- SFT -----------------------------------------------------------------------------------


RESPONSE = "<think> I count 3 red circles, wait, double-check: 3. </think> <answer>3</answer>"


def test_encode_sft_loss_mask_covers_exactly_the_response(processor, tokenizer):
    image = random_image(90, 130, seed=3)
    encoded = processor.encode_sft("How many red circles?", [image], RESPONSE)
    prompt = processor.encode_prompt("How many red circles?", [image])
    assert not encoded.truncated
    assert len(encoded.loss_mask) == len(encoded.input_ids)
    masked = [token for token, keep in zip(encoded.input_ids, encoded.loss_mask) if keep]
    assert tokenizer.decode(masked) == RESPONSE + "<|im_end|>"
    # The mask is one block at the end: nothing in the system/user turns, images or role header.
    assert encoded.loss_mask == [False] * len(prompt.input_ids) + [True] * len(masked)
    assert encoded.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert processor.decode(masked) == RESPONSE
    # The whole example reads as the chat template's rendering of the finished conversation.
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]},
        {"role": "assistant", "content": RESPONSE},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = expanded_template_text(processor, rendered, [processor.image_processor(image)])
    assert tokenizer.decode(encoded.input_ids) + "\n" == expected


def test_encode_sft_truncates_the_response_only(processor):
    prompt_length = len(processor.encode_prompt("How many?", []).input_ids)
    encoded = processor.encode_sft("How many?", [], RESPONSE, max_length=prompt_length + 3)
    assert encoded.truncated
    assert len(encoded.input_ids) == prompt_length + 3 and sum(encoded.loss_mask) == 3
    assert processor.eos_token_id not in encoded.input_ids[prompt_length:]
    with pytest.raises(ValueError, match="no response token"):
        processor.encode_sft("How many?", [], RESPONSE, max_length=prompt_length)
    with pytest.raises(ValueError, match="special token"):
        processor.encode_sft("How many?", [], "3<|im_end|>")


# --- batches -------------------------------------------------------------------------------


def test_collate_prompts_left_pads_with_masks_from_lengths(processor):
    images = [random_image(56, 84, seed=4), random_image(112, 56, seed=6)]
    encoded = [
        processor.encode_prompt("How many red circles?", [images[0]]),
        # Pad-token text inside a real prompt must stay attended: masks come from lengths.
        processor.encode_prompt("Odd <|endoftext|> question without an image", []),
        processor.encode_prompt("A longer question about the second image, please answer it.", [images[1]]),
    ]
    batch = processor.collate_prompts(encoded)
    lengths = [len(sample.input_ids) for sample in encoded]
    width = max(lengths)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, width)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.prompt_lengths.tolist() == lengths
    for row, sample in enumerate(encoded):
        pad = width - len(sample.input_ids)
        assert batch.input_ids[row, pad:].tolist() == sample.input_ids
        assert (batch.input_ids[row, :pad] == processor.pad_token_id).all()
        assert batch.attention_mask[row].tolist() == [False] * pad + [True] * len(sample.input_ids)
    assert processor.pad_token_id in encoded[1].input_ids
    torch.testing.assert_close(batch.pixel_values, torch.cat([encoded[0].pixel_values, encoded[2].pixel_values]))
    assert torch.equal(batch.image_grid_thw, torch.cat([encoded[0].image_grid_thw, encoded[2].image_grid_thw]))
    # Padding must not move any real token's position: each row matches the row encoded alone.
    assert batch.position_ids.shape == (3, 3, width)
    for row, sample in enumerate(encoded):
        alone = mrope_position_ids(
            torch.tensor([sample.input_ids]),
            torch.ones(1, len(sample.input_ids), dtype=torch.bool),
            sample.image_grid_thw,
            image_token_id=processor.image_token_id,
            spatial_merge_size=2,
        )
        assert torch.equal(batch.position_ids[:, row, batch.attention_mask[row]], alone[:, 0])


def test_collate_prompts_text_only_has_no_pixels(processor):
    batch = processor.collate_prompts([processor.encode_prompt("2 + 3?", []), processor.encode_prompt("1?", [])])
    assert batch.pixel_values is None and batch.image_grid_thw is None
    row = 1
    real = batch.attention_mask[row]
    assert batch.position_ids[:, row, real].tolist() == [list(range(int(real.sum())))] * 3


def test_collate_sft_right_pads_with_loss_mask(processor):
    encoded = [
        processor.encode_sft("How many?", [random_image(56, 56, seed=7)], RESPONSE),
        processor.encode_sft("Which option? A) 1 B) 2", [], "<think> B </think> <answer>B</answer>"),
    ]
    batch = processor.collate_sft(encoded)
    lengths = [len(sample.input_ids) for sample in encoded]
    width = max(lengths)
    assert batch.lengths.tolist() == lengths
    assert batch.loss_mask.dtype == torch.bool and batch.attention_mask.dtype == torch.bool
    for row, sample in enumerate(encoded):
        n = len(sample.input_ids)
        assert batch.input_ids[row, :n].tolist() == sample.input_ids
        assert (batch.input_ids[row, n:] == processor.pad_token_id).all()
        assert batch.attention_mask[row].tolist() == [True] * n + [False] * (width - n)
        assert batch.loss_mask[row].tolist() == sample.loss_mask + [False] * (width - n)
    torch.testing.assert_close(batch.pixel_values, encoded[0].pixel_values)
    assert batch.position_ids.shape == (3, 2, width)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.pixel_values is not None


def test_processor_save_and_load(processor, tmp_path):
    custom = Processor(processor.tokenizer, ImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16))
    custom.save_pretrained(tmp_path)
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.image_processor == custom.image_processor
    assert loaded.special_ids == custom.special_ids
    image = random_image(300, 200, seed=8)
    assert loaded.encode_prompt("How many?", [image]).input_ids == custom.encode_prompt("How many?", [image]).input_ids
    # transformers' generate reads the stop ids our engine uses.
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"eos_token_id": list(custom.stop_token_ids), "pad_token_id": custom.pad_token_id}
    # --max-pixels overrides the file's cap and is written back with the next save.
    capped = Processor.from_pretrained(tmp_path, max_pixels=28 * 28 * 4)
    assert (capped.image_processor.max_pixels, capped.image_processor.min_pixels) == (28 * 28 * 4, 28 * 28)
    assert int(capped.encode_prompt("How many?", [image]).image_grid_thw.prod()) // 4 <= 4
    with pytest.raises(ValueError, match="below .* min_pixels"):
        Processor.from_pretrained(tmp_path, max_pixels=28 * 27)
    # Without preprocessor_config.json the defaults apply.
    (tmp_path / "preprocessor_config.json").unlink()
    assert Processor.from_pretrained(tmp_path).image_processor == ImageProcessor()


# --- Qwen3-VL with Qwen's real tokenizer ---------------------------------------------------


def test_qwen3_vl_prompt_matches_transformers(tmp_path):
    """The same image and question through our Processor and through transformers' Qwen3-VL processing, on the hub's
    files (vlaa_min/infra/rehearsal.py writes them: Qwen's real BPE, Qwen3-VL's added tokens, chat template and
    preprocessor_config.json): the same prompt ids, pixel values and grid."""
    write_tokenizer(tmp_path, "qwen3_vl")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR_CONFIG))
    processor = Processor.from_pretrained(tmp_path)
    assert (processor.image_processor.patch_size, processor.image_processor.image_mean) == (16, (0.5, 0.5, 0.5))
    question = "How many red circles are there? Answer with a number."
    for height, width in [(480, 640), (200, 900)]:  # upscaled to 65,536 pixels at least, sides multiples of 32
        image = random_image(height, width, seed=height)
        ours = processor.encode_prompt(question, [image])
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text, their_ids, their_images = reference_prompt(tmp_path, messages, [image])
        assert text == processor.prompt_text(question, 1)
        assert ours.input_ids == their_ids
        assert torch.equal(ours.image_grid_thw, their_images["image_grid_thw"])
        torch.testing.assert_close(ours.pixel_values, their_images["pixel_values"], atol=1e-5, rtol=1e-5)
        grid = ours.image_grid_thw[0].tolist()
        assert grid[1] * grid[2] * 16 * 16 >= QWEN3_VL_PREPROCESSOR_CONFIG["size"]["shortest_edge"]
