"""The real run rehearsed offline (`make rehearse`): Qwen's real tokenizer, Qwen2.5-VL-3B's and Qwen3-VL-2B's widths,
VLAA-Thinking's record layouts, and the real entry points (`make sft`, `make grpo`, `make eval` with MODEL / DATA /
IMAGES set).

What it checks, against transformers' Qwen2.5-VL code on the same files (vlaa_min/infra/rehearsal.py writes them):
- the token ids (special tokens, vocabulary padding 151,665 -> 151,936, stop ids) and both config.json layouts;
- the prompt of a real-format record at the checkpoint's own max_pixels: ids, rendered text (printed), image
  placeholders = grid / 4, the system prompt's emoji, the assistant-only loss mask ending on <|im_end|>;
- SFT -> GRPO (paper preset, 2 steps of 2 prompts x G = 4) -> eval finish and write their outputs, at a smaller
  --max-pixels so that a 2-core CPU runs them in minutes;
- the trained checkpoint loads in Qwen2_5_VLForConditionalGeneration and gives our logits;
- for Qwen3-VL-2B (DeepStack, 2 layers): both config.json layouts, then the same SFT -> GRPO -> eval -> parity.
The prompt reference is vlaa_min/infra/rehearsal.py's `reference_prompt` (transformers' processor, or without
torchvision its tokenizer chat template and PIL image processor).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

import data
import train_grpo
from vlaa_min.config import ModelConfig
from vlaa_min.infra.rehearsal import (
    ADDED_TOKENS, FIRST_ADDED_ID, GENERATION_CONFIG, reference_prompt, write_checkpoint, write_records,
)
from vlaa_min.model import VLModel
from vlaa_min.presets import make_config
from vlaa_min.processor import SYSTEM_PROMPT, Processor

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# At most 64 image tokens per image in the CPU training runs (a token is 28x28 pixels in Qwen2.5-VL, 32x32 in Qwen3-VL).
TRAIN_MAX_PIXELS = {Qwen2_5_VLForConditionalGeneration: 28 * 28 * 64, Qwen3VLForConditionalGeneration: 32 * 32 * 64}
TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    for layout in ("nested", "legacy"):
        write_checkpoint(root / f"model-{layout}", layout)
    return {"root": root, **write_records(root / "data")}


@pytest.fixture(scope="module")
def qwen3_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal-qwen3-vl")
    for layout in ("nested", "legacy"):
        write_checkpoint(root / f"model-{layout}", layout, family="qwen3_vl")
    return {"root": root, **write_records(root / "data")}


def test_token_ids_and_vocabulary_padding(world):
    model_dir = world["root"] / "model-nested"
    processor = Processor.from_pretrained(model_dir)
    tokenizer, config = processor.tokenizer, ModelConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    defaults = Qwen2_5_VLConfig()  # transformers' Qwen2.5-VL ids
    assert [tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS] == list(range(FIRST_ADDED_ID, 151665))
    assert (processor.image_token_id, processor.special_ids["video_token_id"], processor.special_ids[
        "vision_start_token_id"], processor.special_ids["vision_end_token_id"]) == (
        defaults.image_token_id, defaults.video_token_id, defaults.vision_start_token_id, defaults.vision_end_token_id)
    assert (config.image_token_id, config.eos_token_id, config.bos_token_id) == (
        defaults.image_token_id, defaults.text_config.eos_token_id, defaults.text_config.bos_token_id)
    # Generation stops where the hub's generation_config.json says: <|im_end|>, then <|endoftext|>.
    assert processor.stop_token_ids == tuple(GENERATION_CONFIG["eos_token_id"]) == (151645, 151643)
    # The embedding has 151,936 rows for 151,665 tokens: sampling stops at the tokenizer's size (the 271 rows past
    # it decode to nothing) and never picks a vision placeholder.
    assert (processor.vocab_size, config.text.vocab_size) == (151665, 151936)
    assert tokenizer.decode([151665, 151935]) == ""
    assert set(processor.vision_token_ids) == {151652, 151653, 151655, 151656}


def test_both_config_layouts_load_in_ours_and_transformers(world):
    nested, legacy = world["root"] / "model-nested", world["root"] / "model-legacy"
    assert "text_config" in json.loads((nested / "config.json").read_text())
    assert "text_config" not in json.loads((legacy / "config.json").read_text())
    ours = {layout: VLModel.from_pretrained(path) for layout, path in (("nested", nested), ("legacy", legacy))}
    assert ours["nested"].config == ours["legacy"].config
    assert ours["nested"].config.text == ModelConfig.qwen2_5_vl("3b", layers=2, vision_depth=2).text
    for path in (nested, legacy):
        theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        text = theirs.config.text_config
        assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, theirs.config.tie_word_embeddings) == (
            151936, 2048, 2, True)
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
        assert theirs.config.vision_config.fullatt_block_indexes == [1]
        assert torch.equal(theirs.lm_head.weight, ours["legacy"].lm_head.weight)
        del theirs


def test_prompt_of_a_real_record_matches_transformers(world):
    model_dir = world["root"] / "model-nested"
    processor = Processor.from_pretrained(model_dir)
    assert processor.image_processor.max_pixels == 12845056  # the checkpoint's own preprocessor_config.json
    record = data.load_records(world["sft"], world["images"], require_answer=True)[0]  # GeoQA, LaTeX + options
    image = data.load_image(world["images"], record["image"])
    assert image.size == (640, 480)
    ours = processor.encode_prompt(record["question"], [image])

    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
    text, their_ids, their_images = reference_prompt(model_dir, messages, [image])
    print(f"\nrendered prompt ({record['id']}):\n{text}\ntoken ids ({len(ours.input_ids)}, image pads folded):")
    folded = [t for i, t in enumerate(ours.input_ids) if t != 151655 or ours.input_ids[i - 1] != 151655]
    print(folded)

    assert text == processor.prompt_text(record["question"], 1)
    assert ours.input_ids == their_ids
    assert torch.equal(ours.image_grid_thw, their_images["image_grid_thw"])
    assert torch.allclose(ours.pixel_values, their_images["pixel_values"], atol=1e-5)
    # 640x480 -> 476x644 pixels -> a 34x46 patch grid -> 17x23 = 391 merged tokens.
    assert ours.image_grid_thw.tolist() == [[1, 34, 46]]
    assert ours.input_ids.count(151655) == int(ours.image_grid_thw.prod()) // 4 == 391
    system = processor.tokenizer.encode(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
    assert ours.input_ids[: len(system)] == system and processor.tokenizer.decode(system[3:-1]) == SYSTEM_PROMPT
    assert "🤔" in processor.tokenizer.decode(system)

    # SFT: the loss covers exactly the answer and the <|im_end|> that closes the turn.
    sft = processor.encode_sft(record["question"], [image], record["answer"])
    trained = [t for t, m in zip(sft.input_ids, sft.loss_mask) if m]
    assert processor.tokenizer.decode(trained) == record["answer"] + "<|im_end|>"
    assert trained[-1] == processor.eos_token_id and sft.input_ids[: len(ours.input_ids)] == ours.input_ids
    # A 1024x768 image at the hub's max_pixels: 756x1036 pixels -> 27x37 = 999 tokens, so with the system prompt
    # the prompt passes OpenRLHF's 1,024-token limit; the paper preset's limit and image cap hold it.
    grpo_record = data.load_records(world["grpo"], world["images"])[2]
    with Image.open(world["images"] / grpo_record["image"]) as opened:
        assert opened.size == (1024, 768)
    assert processor.prompt_length(grpo_record["question"], [(1024, 768)]) > 1024
    paper = make_config(train_grpo.GRPOConfig, "paper")
    capped = Processor.from_pretrained(model_dir, paper.max_pixels)
    assert capped.prompt_length(grpo_record["question"], [(4000, 3000)]) <= paper.max_prompt_length

    whole = processor.tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": record["answer"]}], tokenize=False)
    assert processor.tokenizer.decode(sft.input_ids) + "\n" == whole.replace(
        "<|image_pad|>", "<|image_pad|>" * 391)


def make(target: str, world, runs: Path, **variables) -> str:
    """Run `make TARGET` in the repository with this interpreter; returns its output."""
    # The running interpreter already has everything: the install step's stamp is never remade (-o).
    stamp = str(runs / "installed")
    settings = {"PY": sys.executable, "STAMP": stamp, "RUNS": str(runs), **variables}
    command = ["make", "--no-print-directory", "-o", stamp, target] + [f"{k}={v}" for k, v in settings.items()]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def theirs_generation_stops(model_dir: Path) -> list[int]:
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(model_dir).eos_token_id


def test_sft_grpo_eval_end_to_end_then_transformers_logits(world):
    sft_grpo_eval_then_parity(world, Qwen2_5_VLForConditionalGeneration)


def test_qwen3_vl_config_layouts_load_in_ours_and_transformers(qwen3_world):
    nested, hub = qwen3_world["root"] / "model-nested", qwen3_world["root"] / "model-legacy"
    assert "rope_scaling" in json.loads((hub / "config.json").read_text())["text_config"]
    ours = {layout: VLModel.from_pretrained(path) for layout, path in (("nested", nested), ("hub", hub))}
    assert ours["nested"].config == ours["hub"].config == ModelConfig.qwen3_vl("2b", layers=2, vision_depth=2)
    for path in (nested, hub):
        theirs = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        text, vision = theirs.config.text_config, theirs.config.vision_config
        assert (text.hidden_size, text.head_dim, text.num_hidden_layers, theirs.config.tie_word_embeddings) == (
            2048, 128, 2, True)
        assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
        assert vision.deepstack_visual_indexes == [0, 1] and vision.patch_size == 16
        assert torch.equal(theirs.lm_head.weight, ours["hub"].lm_head.weight)
        del theirs
    processor = Processor.from_pretrained(hub)
    assert (processor.vocab_size, ours["hub"].config.text.vocab_size) == (151669, 151936)  # Qwen3's 26 added tokens
    assert processor.stop_token_ids == (151645, 151643)


def test_qwen3_vl_sft_grpo_eval_end_to_end_then_transformers_logits(qwen3_world):
    sft_grpo_eval_then_parity(qwen3_world, Qwen3VLForConditionalGeneration)


def sft_grpo_eval_then_parity(world, hf_class):
    """make sft, make grpo (paper preset, 2 steps) and make eval on the hub-layout checkpoint, then the trained
    checkpoint's logits in transformers' `hf_class` on a real-format record with its image."""
    runs, pixels = world["root"] / "runs", f"--max-pixels {TRAIN_MAX_PIXELS[hf_class]}"
    make("sft", world, runs, MODEL=world["root"] / "model-legacy", DATA=world["sft"], IMAGES=world["images"],
         ARGS=f"--steps 2 --batch-size 2 --micro-batch-size 1 --eval-size 1 {pixels}")
    sft_rows = [json.loads(line) for line in (runs / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in sft_rows] == [1, 2] and "eval_loss" in sft_rows[-1]

    make("grpo", world, runs, MODEL=runs / "sft" / "model", DATA=world["grpo"], IMAGES=world["images"],
         ARGS=f"--steps 2 --prompts-per-step 2 --train-batch-size 4 --micro-batch-size 4 --max-new-tokens 8 {pixels}")
    settings = json.loads((runs / "grpo" / "config.json").read_text())  # the resolved config of the run
    assert (settings["group_size"], settings["temperature"], settings["kl_init"]) == (4, 0.8, 1e-3)  # paper preset
    grpo_rows = [json.loads(line) for line in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in grpo_rows] == [1, 2] and all(0 <= row["reward"] <= 1 for row in grpo_rows)

    out = runs / "eval"
    make("eval", world, runs, MODEL=runs / "grpo" / "model", DATA=world["test"], IMAGES=world["images"],
         ARGS=f"--max-new-tokens 8 --batch-size 3 --out {out}")
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["n"] == 3

    # The trained checkpoint in transformers: the same logits as ours on a real-format record with its image.
    model_dir = runs / "grpo" / "model"
    processor = Processor.from_pretrained(model_dir)
    assert processor.image_processor.max_pixels == TRAIN_MAX_PIXELS[hf_class]  # the training setting travels too
    assert theirs_generation_stops(model_dir) == [151645, 151643]
    record = data.load_records(world["grpo"], world["images"])[2]
    batch = data.collate_prompts([record], processor, world["images"])
    ours = VLModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        our_logits = ours(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pixel_values,
                          batch.image_grid_thw)
    del ours
    theirs = hf_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        # transformers 5 finds the image tokens for its MRoPE positions through mm_token_type_ids (1 = image).
        their_logits = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                              mm_token_type_ids=(batch.input_ids == processor.image_token_id).int(),
                              pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw).logits
    assert their_logits.shape == our_logits.shape == (1, batch.input_ids.shape[1], 151936)
    assert (their_logits - our_logits).abs().max().item() <= TOL
