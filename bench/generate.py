"""Rollout speed: vlaa_min's Engine against transformers' `generate` on the same weights.

A tiny random Qwen2.5-VL (ModelConfig.tiny: 4 layers, d=128, vision depth 2) is saved once with
save_pretrained and loaded by both sides. Both sample the same left-padded prompts (a 112x112 image each,
questions of different lengths), G samples per prompt (transformers: num_return_sequences=G), temperature
1.0, no top-k / top-p, exactly `new_tokens` tokens per sample (no stop tokens for ours; eos None and
min_new_tokens for transformers). After one warm-up call per side, the calls alternate (so load on a
shared machine hits both alike) and the median of `repeats` timings is reported as generated tokens per
second (prompts * samples * new_tokens / seconds, the image encoding and prefill included).
On CUDA (bf16 by default) our engine is reported with torch.compile off and on.

    python bench/generate.py                                  # CPU, fp32
    python bench/generate.py --device cuda --dtype bfloat16   # GPU
"""

import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from vlaa_min.cli import parse_config, print_config
from vlaa_min.generate import Engine, SamplingParams
from vlaa_min.config import ModelConfig
from vlaa_min.model import VLModel
from vlaa_min.processor import ImageProcessor, PromptBatch
from vlaa_min.rope import mrope_position_ids
from vlaa_min.runtime import resolve_device, resolve_dtype


@dataclass
class BenchConfig:
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu or cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on cuda, fp32 on cpu), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "also time our engine with torch.compile (always on cuda)"})
    prompts: int = field(default=8, metadata={"help": "prompts per batch"})
    samples: int = field(default=8, metadata={"help": "samples per prompt (G)"})
    new_tokens: int = field(default=64, metadata={"help": "tokens generated per sample"})
    repeats: int = field(default=5, metadata={"help": "timed calls per engine (median reported)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    seed: int = field(default=0, metadata={"help": "weights, prompts and sampling seed"})


def make_prompts(config: ModelConfig, count: int, seed: int) -> PromptBatch:
    """`count` prompts: text, <|vision_start|>, a 112x112 image's pad tokens, <|vision_end|>, a question."""
    rng = np.random.default_rng(seed)
    image_processor = ImageProcessor()
    first_text_id = 1 + max(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                            config.vision_end_token_id, config.eos_token_id, config.pad_token_id)  # fmt: skip
    rows, pixels, grids = [], [], []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
        pixel_values, grid_thw = image_processor(image)
        n_image_tokens = int(grid_thw.prod()) // image_processor.merge_size**2
        text = rng.integers(first_text_id, config.text.vocab_size, 12 + 3 * index).tolist()
        rows.append(text[:6] + [config.vision_start_token_id] + [config.image_token_id] * n_image_tokens
                    + [config.vision_end_token_id] + text[6:])  # fmt: skip
        pixels.append(pixel_values)
        grids.append(grid_thw)
    lengths = torch.tensor([len(row) for row in rows])
    width = int(lengths.max())
    input_ids = torch.full((count, width), config.pad_token_id, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row)
    attention_mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]  # (B, T) left padding
    image_grid_thw = torch.stack(grids)
    position_ids = mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id=config.image_token_id,
                                      spatial_merge_size=config.vision.spatial_merge_size)  # fmt: skip
    return PromptBatch(input_ids, attention_mask, position_ids, torch.cat(pixels), image_grid_thw, lengths)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model_config = ModelConfig.tiny("qwen2_5_vl")
    with tempfile.TemporaryDirectory() as weights:
        VLModel(model_config).save_pretrained(weights)
        ours = VLModel.from_pretrained(weights, dtype=dtype, device=device).eval()
        theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(weights, dtype=dtype).to(device).eval()
    theirs.generation_config.eos_token_id = None  # every sample runs the full new_tokens
    theirs.generation_config.pad_token_id = model_config.pad_token_id

    batch = make_prompts(model_config, cfg.prompts, cfg.seed).to(device)
    mm_token_type_ids = (batch.input_ids == model_config.image_token_id).long()  # transformers' MRoPE needs it
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=1.0)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # transformers samples from the global generator
    n_tokens = cfg.prompts * cfg.samples * cfg.new_tokens

    def run_transformers():
        with torch.inference_mode():
            out = theirs.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                mm_token_type_ids=mm_token_type_ids, pixel_values=batch.pixel_values.to(dtype),
                image_grid_thw=batch.image_grid_thw, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=cfg.samples, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
            )  # fmt: skip
        assert out.shape == (cfg.prompts * cfg.samples, batch.input_ids.shape[1] + cfg.new_tokens), out.shape

    def engine_runner(engine: Engine):
        def run():
            rollout = engine.generate(batch, cfg.samples, params, generator)
            assert rollout.completion_ids.shape == (cfg.prompts * cfg.samples, cfg.new_tokens)

        return run

    runners = {"vlaa_min Engine": engine_runner(Engine(ours, model_config.pad_token_id))}
    if cfg.compile or device.type == "cuda":
        runners["vlaa_min Engine, torch.compile"] = engine_runner(Engine(ours, model_config.pad_token_id, compile=True))
    runners["transformers generate"] = run_transformers

    for run in runners.values():  # warm-up (and compilation)
        run()
    seconds = {name: [] for name in runners}
    for _ in range(cfg.repeats):
        for name, run in runners.items():
            seconds[name].append(timed(run, device))
    wall = {name: statistics.median(w for w, _ in times) for name, times in seconds.items()}
    cpu = {name: statistics.median(c for _, c in times) for name, times in seconds.items()}

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{cfg.prompts} prompts x {cfg.samples} samples x {cfg.new_tokens} new tokens, 112x112 image each; "
          f"{device_name}, {str(dtype).removeprefix('torch.')}; median of {cfg.repeats}\n")  # fmt: skip
    # On a shared CPU the wall time also counts other processes; the process CPU time does not (with one
    # thread it is the cleaner comparison; with several it includes threads spinning while they wait).
    print("| engine | tokens/s | wall s | vs transformers | process CPU s | vs transformers (CPU s) |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = "transformers generate"
    for name in runners:
        print(f"| {name} | {n_tokens / wall[name]:,.0f} | {wall[name]:.3f} | {wall[reference] / wall[name]:.2f}x "
              f"| {cpu[name]:.3f} | {cpu[reference] / cpu[name]:.2f}x |")
    print(f"\ncommand: python {' '.join(shlex.quote(arg) for arg in sys.argv)}")


if __name__ == "__main__":
    config = parse_config(BenchConfig, description=__doc__.split("\n\n")[0])
    print_config(config)
    main(config)
