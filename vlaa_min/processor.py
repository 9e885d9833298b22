"""Images and chat text -> the tensors a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model reads.

- `smart_resize` + `ImageProcessor`: Qwen's image preprocessing. The image is resized so that both sides are
  multiples of 28 (a 2x2 block of 14-pixel patches, which the vision merger turns into one LLM token) and its
  area lies in [min_pixels, max_pixels]; then it is scaled to [0, 1], normalised with OpenAI CLIP's mean/std,
  repeated to 2 frames (the vision tower's patches are 2 frames deep, made for video) and cut into flat patches,
  ordered 2x2 merge block by merge block as the vision tower expects. Output equals transformers'
  Qwen2VLImageProcessor (tests/test_processor.py checks it). Qwen3-VL uses the same steps with 16-pixel patches
  (sides multiples of 32) and mean = std = 0.5, all read from its preprocessor_config.json.
- `Processor`: the chat prompt with the paper's system prompt (ChatML, image placeholders before the question),
  token ids with each <|image_pad|> expanded to one token per merged patch, SFT examples with an assistant-only
  loss mask, and left-/right-padded batches with attention masks built from lengths and MRoPE position ids
  (from rope.py).

Deviations from transformers' Qwen2VLProcessor: images only (no video input), one user turn per sample, and SFT
targets are tokenised apart from the prompt so the loss-mask boundary is exact. A prompt longer than max_length
is an error (never cut inside an image span); an SFT response that does not fit is cut at the end and flagged
(`EncodedSFT.truncated`) so the trainer can report truncation rates.

    processor = Processor.from_pretrained("path/to/Qwen2.5-VL-3B-Instruct")   # or our toy checkpoint
    prompts = [processor.encode_prompt(question, [image]) for question, image in rows]
    batch = processor.collate_prompts(prompts)        # batch.input_ids (B, T) left padded, ...
    text = processor.decode(generated_ids)            # <think>/<answer> tags kept
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlaa_min.rope import mrope_position_ids
from vlaa_min.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    special_token_ids,
)

SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a "
    "question, and you should try to solve it. You should first think about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
    "</think> <answer> answer here </answer>"
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN3_VL_MEAN_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
GENERATION_CONFIG = "generation_config.json"
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen's target size: sides multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"smart_resize: aspect ratio {max(height, width) / min(height, width):.1f} of a {height}x{width} "
            f"image exceeds {MAX_ASPECT_RATIO}"
        )
    # Python's round (half to even) on purpose: it is the rule Qwen's checkpoints were trained with.
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        # Shrink both sides by the same factor, rounding down so the area stays under the cap.
        scale = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / scale / factor) * factor)
        resized_width = max(factor, math.floor(width / scale / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        # Grow both sides by the same factor, rounding up so the area reaches the floor.
        scale = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * scale / factor) * factor
        resized_width = math.ceil(width * scale / factor) * factor
    return resized_height, resized_width


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparency is composited onto white, as Qwen's processor does."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    """Qwen2-VL image preprocessing: PIL image -> (flat patches, patch grid)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns pixel_values (N, 3*T*P*P) float32 and grid_thw (3,) long, N = grid_h * grid_w."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor: expected a PIL.Image.Image, got {type(image).__name__}")
        rgb = _to_rgb(image)
        height, width = smart_resize(
            rgb.height, rgb.width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        if (width, height) != rgb.size:
            rgb = rgb.resize((width, height), resample=self.resample)

        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)  # (H, W, 3)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        pixels = ((pixels - mean) / std).permute(2, 0, 1)  # (3, H, W)

        patch, merge, frames = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // patch, width // patch
        # A still image is a clip of `frames` identical frames.
        clip = pixels.unsqueeze(0).expand(frames, -1, -1, -1)  # (T, 3, H, W)
        clip = clip.reshape(frames, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        # Patch order: merge block row, merge block column, row inside block, column inside block;
        # each patch flattened as (channel, frame, y, x) -- the layout of the vision tower's Conv3d.
        clip = clip.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (gh/m, gw/m, m, m, 3, T, P, P)
        pixel_values = clip.reshape(grid_h * grid_w, self.patch_dim).contiguous()  # (N, D)
        grid_thw = torch.tensor([1, grid_h, grid_w], dtype=torch.long)
        return pixel_values, grid_thw

    @classmethod
    def for_model(cls, config) -> "ImageProcessor":
        """The preprocessing a model's family ships, at the default pixel limits: its patch and merge sizes, and
        Qwen3-VL's mean = std = 0.5 instead of CLIP's (what a new checkpoint, e.g. the toy model's, writes)."""
        vision = config.vision
        normalise = {}
        if config.model_type == "qwen3_vl":
            normalise = dict(image_mean=QWEN3_VL_MEAN_STD, image_std=QWEN3_VL_MEAN_STD)
        return cls(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                   merge_size=vision.spatial_merge_size, **normalise)

    @classmethod
    def from_dict(cls, config: dict, source: str = "preprocessor config") -> "ImageProcessor":
        """Read Qwen's preprocessor_config.json keys (min/max_pixels, or the newer size dict)."""
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(key) is False:
                raise ValueError(f"{source}: field '{key}' is false; only Qwen's full preprocessing is supported")
        values = {}
        size = config.get("size") or {}
        # Newer files write the pixel limits as size.shortest_edge / size.longest_edge (areas, not sides).
        size_keys = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels"}
        size_keys |= {"min_pixels": "min_pixels", "max_pixels": "max_pixels"}
        for size_key, key in size_keys.items():
            if size_key in size:
                values[key] = size[size_key]
        # Explicit min/max_pixels win over "size", as in transformers.
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "resample"):
            if config.get(key) is not None:
                values[key] = config[key]
        for key, value in values.items():
            smallest = 0 if key == "resample" else 1  # resample 0 is PIL's NEAREST
            if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
                raise ValueError(f"{source}: field '{key}' must be an integer >= {smallest}, got {value!r}")
        for key in ("image_mean", "image_std"):
            if key in config:
                channel_values = config[key]
                if not isinstance(channel_values, (list, tuple)) or len(channel_values) != 3:
                    raise ValueError(f"{source}: field '{key}' must be a list of 3 numbers, got {channel_values!r}")
                values[key] = tuple(float(value) for value in channel_values)
        processor = cls(**values)
        if processor.min_pixels > processor.max_pixels:
            raise ValueError(f"{source}: min_pixels {processor.min_pixels} > max_pixels {processor.max_pixels}")
        return processor

    def to_dict(self) -> dict:
        """preprocessor_config.json contents that both this class and transformers read."""
        config = asdict(self)
        config["image_mean"] = list(self.image_mean)
        config["image_std"] = list(self.image_std)
        config["resample"] = int(self.resample)
        config["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        config["image_processor_type"] = "Qwen2VLImageProcessor"
        return config


@dataclass
class EncodedPrompt:
    input_ids: list[int]  # image pads already expanded
    pixel_values: torch.Tensor | None  # (N, D) for all of this sample's images, None without images
    image_grid_thw: torch.Tensor | None  # (I, 3)


@dataclass
class EncodedSFT:
    input_ids: list[int]  # prompt + response + <|im_end|>
    loss_mask: list[bool]  # True on the response tokens and the closing <|im_end|>
    pixel_values: torch.Tensor | None  # (N, D)
    image_grid_thw: torch.Tensor | None  # (I, 3)
    truncated: bool  # the response was cut to fit max_length (its <|im_end|> is then missing)


def _move(batch, device):
    """A copy of `batch` with every tensor on `device` (absent images stay None)."""
    tensors = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return replace(batch, **{name: value.to(device) for name, value in tensors.items() if value is not None})


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, T) left padded
    attention_mask: torch.Tensor  # (B, T) bool
    position_ids: torch.Tensor  # (3, B, T) MRoPE (temporal, height, width)
    pixel_values: torch.Tensor | None  # (sum N, D), images in row order
    image_grid_thw: torch.Tensor | None  # (I, 3)
    prompt_lengths: torch.Tensor  # (B,)

    def to(self, device) -> "PromptBatch":
        return _move(self, device)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) right padded
    attention_mask: torch.Tensor  # (B, T) bool
    position_ids: torch.Tensor  # (3, B, T)
    pixel_values: torch.Tensor | None  # (sum N, D)
    image_grid_thw: torch.Tensor | None  # (I, 3)
    loss_mask: torch.Tensor  # (B, T) bool
    lengths: torch.Tensor  # (B,)
    truncated: torch.Tensor  # (B,) bool: the response was cut to fit max_length

    def to(self, device) -> "SFTBatch":
        return _move(self, device)


class Processor:
    """Tokenizer + image processor + the special ids: everything between raw samples and the model."""

    def __init__(self, tokenizer, image_processor: ImageProcessor | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.special_ids = special_token_ids(tokenizer)
        self.image_token_id = self.special_ids["image_token_id"]
        self.eos_token_id = self.special_ids["eos_token_id"]
        self.pad_token_id = self.special_ids["pad_token_id"]
        # Generation ends a turn at <|im_end|>; <|endoftext|> also stops a base model that never learned ChatML.
        self.stop_token_ids = tuple(dict.fromkeys([self.eos_token_id, self.pad_token_id]))
        # Placeholders that only the processor may write into a prompt; generation must never emit them.
        self.vision_token_ids = tuple(self.special_ids[name] for name in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))

    @classmethod
    def from_pretrained(cls, path: str | Path, max_pixels: int | None = None) -> "Processor":
        """Load the tokenizer (AutoTokenizer) and preprocessor_config.json (defaults if absent).

        max_pixels overrides the file's cap on an image's resized area (Qwen2.5-VL's hub file allows 12,845,056
        pixels, up to 16,384 tokens per image); save_pretrained writes the value used, so it travels with the model.
        """
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        config_path = Path(path) / PREPROCESSOR_CONFIG
        image_processor = ImageProcessor()
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_path}: not valid JSON ({error})") from error
            image_processor = ImageProcessor.from_dict(config, source=str(config_path))
        if max_pixels:
            if max_pixels < image_processor.min_pixels:
                raise ValueError(f"max_pixels {max_pixels} is below {config_path}'s min_pixels "
                                 f"{image_processor.min_pixels}")
            image_processor = replace(image_processor, max_pixels=max_pixels)
        return cls(tokenizer, image_processor)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows; a checkpoint's embedding may have more rows (padding, never sampled)."""
        return len(self.tokenizer)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Chat template inside tokenizer_config.json, where Qwen's checkpoints keep it.
        self.tokenizer.save_pretrained(str(path), save_jinja_files=False)
        (path / PREPROCESSOR_CONFIG).write_text(json.dumps(self.image_processor.to_dict(), indent=2) + "\n")
        # The stop ids our engine uses, so that transformers' generate and vLLM end a turn where it does.
        generation = {"eos_token_id": list(self.stop_token_ids), "pad_token_id": self.pad_token_id}
        (path / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")

    # --- text -------------------------------------------------------------------------------

    def prompt_text(self, question: str, num_images: int = 1, system: str | None = SYSTEM_PROMPT) -> str:
        """ChatML prompt ending with the assistant header; one unexpanded image placeholder per image.

        system=None gives Qwen's default system turn, as the chat template does without one.
        """
        if system is None:
            system = DEFAULT_SYSTEM_PROMPT
        images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
        return (
            f"{IM_START}system\n{system}{IM_END}\n"
            f"{IM_START}user\n{images}{question}{IM_END}\n"
            f"{IM_START}assistant\n"
        )

    def decode(self, ids) -> str:
        """Text of `ids` (list or 1-D tensor) without special tokens; <think>/<answer> tags stay."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- one sample -------------------------------------------------------------------------

    def prompt_length(self, question: str, image_sizes: list[tuple[int, int]]) -> int:
        """len(encode_prompt(question, images).input_ids) for images of these (width, height), without their pixels."""
        ip = self.image_processor
        factor = ip.patch_size * ip.merge_size
        resized = [smart_resize(height, width, factor, ip.min_pixels, ip.max_pixels) for width, height in image_sizes]
        text_ids = self.tokenizer.encode(self.prompt_text(question, len(image_sizes)), add_special_tokens=False)
        return len(text_ids) - len(image_sizes) + sum(h * w // factor**2 for h, w in resized)

    def target_length(self, response: str) -> int:
        """The tokens encode_sft trains on for `response`: the response's and the <|im_end|> that closes it."""
        return len(self.tokenizer.encode(response, add_special_tokens=False)) + 1

    def encode_prompt(
        self, question: str, images: list[Image.Image], max_length: int | None = None
    ) -> EncodedPrompt:
        """Prompt token ids with every image pad expanded, plus the images' patches."""
        encoded_images = [self.image_processor(image) for image in images]
        text_ids = self.tokenizer.encode(self.prompt_text(question, len(images)), add_special_tokens=False)
        if text_ids.count(self.image_token_id) != len(images):
            raise ValueError(
                f"encode_prompt: expected {len(images)} {IMAGE_PAD} token(s) for {len(images)} image(s), found "
                f"{text_ids.count(self.image_token_id)}; does the question text contain '{IMAGE_PAD}'?"
            )

        # One <|image_pad|> per merged patch: the model swaps each for one vision embedding.
        merge_area = self.image_processor.merge_size**2
        input_ids = []
        images_seen = 0
        for token_id in text_ids:
            if token_id == self.image_token_id:
                _, grid_thw = encoded_images[images_seen]
                input_ids.extend([token_id] * (int(grid_thw.prod()) // merge_area))
                images_seen += 1
            else:
                input_ids.append(token_id)

        if max_length is not None and len(input_ids) > max_length:
            raise ValueError(
                f"encode_prompt: the prompt has {len(input_ids)} tokens (images included), more than "
                f"max_length={max_length}; lower max_pixels or raise max_length"
            )
        if not encoded_images:
            return EncodedPrompt(input_ids, None, None)
        pixel_values = torch.cat([pixels for pixels, _ in encoded_images])  # (N, D)
        image_grid_thw = torch.stack([grid for _, grid in encoded_images])  # (I, 3)
        return EncodedPrompt(input_ids, pixel_values, image_grid_thw)

    def encode_sft(
        self, question: str, images: list[Image.Image], response: str, max_length: int | None = None
    ) -> EncodedSFT:
        """Prompt + response + <|im_end|>, with the loss on the response and that <|im_end|> only.

        The response is tokenised on its own so the prompt/response boundary is exact.
        """
        prompt = self.encode_prompt(question, images, max_length=max_length)
        response_ids = self.tokenizer.encode(response, add_special_tokens=False)
        special_ids = set(self.tokenizer.all_special_ids)
        if any(token_id in special_ids for token_id in response_ids):
            raise ValueError(
                f"encode_sft: the response contains special token text ({self.tokenizer.all_special_tokens}); "
                f"response starts {response[:80]!r}"
            )
        target_ids = response_ids + [self.eos_token_id]
        truncated = False
        if max_length is not None and len(prompt.input_ids) + len(target_ids) > max_length:
            room = max_length - len(prompt.input_ids)
            if room == 0:
                raise ValueError(
                    f"encode_sft: the prompt alone fills max_length={max_length}; no response token would be trained"
                )
            target_ids = target_ids[:room]
            truncated = True
        return EncodedSFT(
            input_ids=prompt.input_ids + target_ids,
            loss_mask=[False] * len(prompt.input_ids) + [True] * len(target_ids),
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            truncated=truncated,
        )

    # --- batches ----------------------------------------------------------------------------

    def _pad(self, sequences: list[list[int]], value, dtype, left: bool) -> torch.Tensor:
        width = max(len(sequence) for sequence in sequences)
        out = torch.full((len(sequences), width), value, dtype=dtype)
        for row, sequence in enumerate(sequences):
            if sequence:
                span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
                out[row, span] = torch.tensor(sequence, dtype=dtype)
        return out

    def _lengths_mask(self, lengths: torch.Tensor, width: int, left: bool) -> torch.Tensor:
        columns = torch.arange(width).unsqueeze(0)  # (1, T)
        if left:
            return columns >= (width - lengths).unsqueeze(1)  # (B, T)
        return columns < lengths.unsqueeze(1)  # (B, T)

    def _images(self, encoded) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        with_images = [sample for sample in encoded if sample.pixel_values is not None]
        if not with_images:
            return None, None
        pixel_values = torch.cat([sample.pixel_values for sample in with_images])  # (sum N, D)
        image_grid_thw = torch.cat([sample.image_grid_thw for sample in with_images])  # (I, 3)
        return pixel_values, image_grid_thw

    def _position_ids(self, input_ids, attention_mask, image_grid_thw) -> torch.Tensor:
        return mrope_position_ids(
            input_ids,
            attention_mask,
            image_grid_thw,
            image_token_id=self.image_token_id,
            spatial_merge_size=self.image_processor.merge_size,
        )  # (3, B, T)

    def collate_prompts(self, encoded: list[EncodedPrompt]) -> PromptBatch:
        """Left-padded prompt batch for generation (every row ends at the last column)."""
        if not encoded:
            raise ValueError("collate_prompts: empty list of prompts")
        fields, lengths = self._padded(encoded, left=True)
        return PromptBatch(**fields, prompt_lengths=lengths)

    def collate_sft(self, encoded: list[EncodedSFT]) -> SFTBatch:
        """Right-padded training batch with the assistant-only loss mask."""
        if not encoded:
            raise ValueError("collate_sft: empty list of examples")
        fields, lengths = self._padded(encoded, left=False)
        return SFTBatch(
            **fields,
            loss_mask=self._pad([sample.loss_mask for sample in encoded], False, torch.bool, left=False),  # (B, T)
            lengths=lengths,
            truncated=torch.tensor([sample.truncated for sample in encoded]),
        )

    def _padded(self, encoded: list, left: bool) -> tuple[dict, torch.Tensor]:
        """The fields every batch has (ids, attention mask, MRoPE positions, images), padded on one side, and the
        lengths (B,)."""
        lengths = torch.tensor([len(sample.input_ids) for sample in encoded])  # (B,)
        input_ids = self._pad([sample.input_ids for sample in encoded], self.pad_token_id, torch.long, left=left)
        attention_mask = self._lengths_mask(lengths, input_ids.shape[1], left=left)  # (B, T)
        pixel_values, image_grid_thw = self._images(encoded)
        position_ids = self._position_ids(input_ids, attention_mask, image_grid_thw)  # (3, B, T)
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    pixel_values=pixel_values, image_grid_thw=image_grid_thw), lengths
