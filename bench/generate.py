"""Rollout speed: vlaa_min's Engine against transformers' `generate` on the same weights.

Both sides share one set of random weights (no download is possible): `--config tiny` is the 1M-parameter toy
Qwen2.5-VL (4 layers, d=128, vision depth 2, 112x112 images, short questions); `--config qwen2.5-vl-3b` / `-7b`
and `qwen3-vl-2b` / `-4b` / `-8b` have the released models' widths (ModelConfig.qwen2_5_vl / qwen3_vl: the
151,936-token vocabulary, head_dim 128, MRoPE, the vision tower, Qwen3's DeepStack), `--layers K` cuts the decoder's
depth (the vision tower is cut in proportion unless `--vision-depth`), and each prompt is like the paper's: its
system prompt, one image of 256 tokens (448x448, Qwen3-VL 512x512) and a question. G samples per prompt
(transformers: num_return_sequences=G), temperature 1.0, no top-k / top-p, exactly `new_tokens` tokens per sample
(no stop tokens for ours; eos None and min_new_tokens for transformers).
Engines (`--engines`): ours eager, ours compiled (torch.compile of the decode step), ours with CUDA graphs (the
compiled step captured per shape bucket, GPU), transformers' default `generate`, and transformers' best setting:
a static cache with its decode forward compiled by `generate` itself (CompileConfig; on CPU `_compile_all_devices`
and mode "default", as "reduce-overhead" means CUDA graphs). After one warm-up call per engine, the calls
alternate (so load on a shared machine hits all alike) and the median of `repeats` timings is reported as
generated tokens per second (prompts * samples * new_tokens / seconds, image encoding and prefill included).

    python bench/generate.py                                                   # tiny, CPU, fp32
    python bench/generate.py --config qwen2.5-vl-3b --layers 2 --prompts 1     # real widths on a CPU
    python bench/generate.py --config qwen2.5-vl-3b --new-tokens 512           # GPU, bf16, full depth
    python bench/generate.py --config qwen3-vl-2b --layers 2 --prompts 1       # Qwen3-VL's widths on a CPU
"""

import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import (
    CompileConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
)
from transformers.initialization import no_init_weights

from vlaa_min.config import ModelConfig
from vlaa_min.generate import Engine, SamplingParams
from vlaa_min.infra.cli import ConfigError, parse_config, print_config
from vlaa_min.infra.runtime import resolve_device, resolve_dtype
from vlaa_min.model import VLModel, _hf_to_ours
from vlaa_min.processor import SYSTEM_PROMPT, ImageProcessor, PromptBatch
from vlaa_min.rope import mrope_position_ids

CONFIGS = ("tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b")
PRESETS = {"qwen2.5-vl-": ModelConfig.qwen2_5_vl, "qwen3-vl-": ModelConfig.qwen3_vl}  # --config prefix -> widths
HF_MODELS = {"qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
             "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration)}
ENGINES = ("ours", "ours-compiled", "ours-graphs", "hf", "hf-static")
ENGINE_NAMES = {
    "ours": "vlaa_min Engine",
    "ours-compiled": "vlaa_min Engine, torch.compile",
    "ours-graphs": "vlaa_min Engine, compiled + CUDA graphs",
    "hf": "transformers generate",
    "hf-static": "transformers generate, static cache + compile",
}
# The chat template's tokens around the system turn, the user turn and the assistant's opening
# (<|im_start|>system\n ... <|im_end|>\n<|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n).
CHAT_FRAMING_TOKENS = 13
# No Qwen tokenizer can be downloaded here: the system prompt's length is taken at English BPE's ~4 characters a token.
SYSTEM_PROMPT_TOKENS = round(len(SYSTEM_PROMPT) / 4)


@dataclass
class BenchConfig:
    config: str = field(default="tiny", metadata={"help": f"model widths: {', '.join(CONFIGS)}"})
    layers: int = field(default=0, metadata={"help": "decoder layers (0 = the config's full depth)"})
    vision_depth: int = field(default=0, metadata={"help": "vision blocks (0 = full, or cut like --layers)"})
    engines: str = field(default="auto", metadata={"help": f"comma-separated of {', '.join(ENGINES)}; auto: "
                                                            "by config and device (printed)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu or cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on cuda, fp32 on cpu), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "with --engines auto: also time ours compiled"})
    prompts: int = field(default=8, metadata={"help": "prompts per batch"})
    samples: int = field(default=8, metadata={"help": "samples per prompt (G)"})
    new_tokens: int = field(default=64, metadata={"help": "tokens generated per sample"})
    repeats: int = field(default=5, metadata={"help": "timed calls per engine (median reported)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    seed: int = field(default=0, metadata={"help": "weights, prompts and sampling seed"})


def model_config_for(cfg: BenchConfig) -> ModelConfig:
    """The bench's ModelConfig: the tiny toy, or a real model's widths with its depth cut by --layers."""
    if cfg.config not in CONFIGS:
        raise ConfigError(f"--config must be one of {', '.join(CONFIGS)}, got {cfg.config!r}")
    if cfg.config == "tiny":
        if cfg.layers or cfg.vision_depth:
            raise ConfigError("--layers / --vision-depth apply to the real-width configs only")
        return ModelConfig.tiny("qwen2_5_vl")
    prefix, size = cfg.config[: cfg.config.rindex("-") + 1], cfg.config[cfg.config.rindex("-") + 1 :]
    preset = PRESETS[prefix]
    full = preset(size)
    layers = cfg.layers or full.text.num_hidden_layers
    vision_depth = cfg.vision_depth or max(1, round(full.vision.depth * layers / full.text.num_hidden_layers))
    config = preset(size, layers=layers, vision_depth=vision_depth)
    config.pad_token_id = config.bos_token_id  # <|endoftext|>, the pad token of Qwen's tokenizer
    return config


def build_models(model_config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """Our VLModel with random weights, and transformers' model holding the very same tensors (no second copy)."""
    with torch.device(device):
        ours = VLModel(model_config).to(dtype).eval()
    config_class, model_class = HF_MODELS[model_config.model_type]
    with no_init_weights(), torch.device(device):
        theirs = model_class(config_class(**model_config.to_hf_dict()))
    state = ours.state_dict()
    theirs.load_state_dict({name: state[_hf_to_ours(name)] for name in theirs.state_dict()}, assign=True)
    theirs.to(dtype).eval()
    theirs.generation_config.eos_token_id = None  # every sample runs the full new_tokens
    theirs.generation_config.pad_token_id = model_config.pad_token_id
    return ours, theirs


def make_prompts(config: ModelConfig, count: int, seed: int) -> PromptBatch:
    """`count` left-padded prompts of random text ids around <|vision_start|>, an image's pad tokens, <|vision_end|>.

    Tiny config: 6 text tokens, a 112x112 image, a question of 6 + 3 * i tokens. Real widths: the chat framing
    and the paper's system prompt, an image of 16 x 16 merged patches, a question of 24 + 8 * i tokens.
    """
    rng = np.random.default_rng(seed)
    image_processor = ImageProcessor.for_model(config)
    tiny = config.text.vocab_size < 100_000
    specials = (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id,
                config.eos_token_id, config.pad_token_id)  # fmt: skip
    # Text ids avoid the special tokens: above them in the toy vocabulary, below them in Qwen's.
    low, high = (1 + max(specials), config.text.vocab_size) if tiny else (0, min(specials))
    side = (4 if tiny else 16) * image_processor.patch_size * image_processor.merge_size  # sides in merged patches
    rows, pixels, grids = [], [], []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        pixel_values, grid_thw = image_processor(image)
        n_image_tokens = int(grid_thw.prod()) // image_processor.merge_size**2
        before = 6 if tiny else CHAT_FRAMING_TOKENS - 5 + SYSTEM_PROMPT_TOKENS  # framing after the image: 5
        after = 6 + 3 * index if tiny else 24 + 8 * index + 5
        text = rng.integers(low, high, before + after).tolist()
        rows.append(text[:before] + [config.vision_start_token_id] + [config.image_token_id] * n_image_tokens
                    + [config.vision_end_token_id] + text[before:])  # fmt: skip
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


def choose_engines(cfg: BenchConfig, device: torch.device) -> list[str]:
    if cfg.engines != "auto":
        names = [name.strip() for name in cfg.engines.split(",") if name.strip()]
        unknown = [name for name in names if name not in ENGINES]
        if unknown or not names:
            raise ConfigError(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
        if "ours-graphs" in names and device.type != "cuda":
            raise ConfigError("--engines ours-graphs needs --device cuda")
        return names
    on_gpu = device.type == "cuda"
    if cfg.config == "tiny":
        ours = ["ours"] + (["ours-compiled"] if cfg.compile or on_gpu else []) + (["ours-graphs"] if on_gpu else [])
        return ours + ["hf"]
    return ["ours-graphs" if on_gpu else "ours-compiled", "hf", "hf-static"]


def timed(fn, device: torch.device) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, peak device bytes or 0) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    return time.perf_counter() - start, time.process_time() - start_cpu, peak


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    engines = choose_engines(cfg, device)
    print(f"engines: {', '.join(engines)}")
    torch.manual_seed(cfg.seed)
    model_config = model_config_for(cfg)
    ours, theirs = build_models(model_config, dtype, device)

    batch = make_prompts(model_config, cfg.prompts, cfg.seed).to(device)
    mm_token_type_ids = (batch.input_ids == model_config.image_token_id).long()  # transformers' MRoPE needs it
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=1.0)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # transformers samples from the global generator
    n_tokens = cfg.prompts * cfg.samples * cfg.new_tokens
    rows = cfg.prompts * cfg.samples

    def transformers_runner(static: bool):
        settings = {}
        if static:
            # transformers compiles its decode forward itself when the cache is static; on CPU only when asked.
            compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
            compile_config._compile_all_devices = device.type != "cuda"
            settings = dict(cache_implementation="static", compile_config=compile_config)

        def run():
            with torch.inference_mode():
                out = theirs.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                    mm_token_type_ids=mm_token_type_ids, pixel_values=batch.pixel_values.to(dtype),
                    image_grid_thw=batch.image_grid_thw, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    num_return_sequences=cfg.samples, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                    **settings,
                )  # fmt: skip
            if out.shape != (rows, batch.input_ids.shape[1] + cfg.new_tokens):
                raise RuntimeError(f"transformers generated {tuple(out.shape)}")

        return run

    def engine_runner(engine: Engine):
        def run():
            rollout = engine.generate(batch, cfg.samples, params, generator)
            if rollout.completion_ids.shape != (rows, cfg.new_tokens):
                raise RuntimeError(f"the engine generated {tuple(rollout.completion_ids.shape)}")

        return run

    pad = model_config.pad_token_id
    makers = {
        "ours": lambda: engine_runner(Engine(ours, pad)),
        "ours-compiled": lambda: engine_runner(Engine(ours, pad, compile=True)),
        "ours-graphs": lambda: engine_runner(Engine(ours, pad, compile=True, cuda_graphs=True)),
        "hf": lambda: transformers_runner(static=False),
        "hf-static": lambda: transformers_runner(static=True),
    }
    runners = {name: makers[name]() for name in engines}
    for name, run in runners.items():  # warm-up (and compilation)
        start = time.perf_counter()
        run()
        print(f"{name}: warm-up call {time.perf_counter() - start:.1f} s", flush=True)
    timings = {name: [] for name in runners}
    for repeat in range(cfg.repeats):
        for name, run in runners.items():
            timings[name].append(timed(run, device))
            print(f"repeat {repeat + 1}: {name} {timings[name][-1][0]:.3f} s", flush=True)  # kept if a run is cut short
    wall = {name: statistics.median(t[0] for t in times) for name, times in timings.items()}
    cpu = {name: statistics.median(t[1] for t in times) for name, times in timings.items()}
    peak = {name: max(t[2] for t in times) for name, times in timings.items()}

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU, {torch.get_num_threads()} threads"
    text = model_config.text
    print(f"\n{cfg.config}: {text.num_hidden_layers} layers, d={text.hidden_size}, vocab {text.vocab_size:,}, "
          f"vision depth {model_config.vision.depth}; {sum(p.numel() for p in ours.parameters()) / 1e6:,.0f}M "
          f"parameters ({sum(p.numel() * p.element_size() for p in ours.parameters()) / 2**30:.1f} GiB); {cfg.prompts} prompts x G={cfg.samples} x {cfg.new_tokens} new tokens, "
          f"{batch.input_ids.shape[1]}-token prompts; {device_name}, {str(dtype).removeprefix('torch.')}; "
          f"median of {cfg.repeats}\n")  # fmt: skip
    # On a shared CPU the wall time also counts other processes; the process CPU time does not (with one
    # thread it is the cleaner comparison; with several it includes threads spinning while they wait).
    references = [name for name in ("hf", "hf-static") if name in runners]
    short = {"hf": "transformers", "hf-static": "transformers static"}
    wall_columns = "".join(f" vs {short[ref]} |" for ref in references)
    cpu_columns = "".join(f" vs {short[ref]} (CPU s) |" for ref in references)
    memory = " peak GiB |" if device.type == "cuda" else ""
    print(f"| engine | tokens/s | wall s |{wall_columns} process CPU s |{cpu_columns}{memory}")
    print("|---|---:|---:|" + "---:|" * (2 * len(references) + 1 + bool(memory)))
    for name in runners:
        wall_ratios = "".join(f" {wall[ref] / wall[name]:.2f}x |" for ref in references)
        cpu_ratios = "".join(f" {cpu[ref] / cpu[name]:.2f}x |" for ref in references)
        gib = f" {peak[name] / 2**30:.1f} |" if memory else ""
        print(f"| {ENGINE_NAMES[name]} | {n_tokens / wall[name]:,.0f} | {wall[name]:.3f} |{wall_ratios} "
              f"{cpu[name]:.3f} |{cpu_ratios}{gib}")
    print(f"\ncommand: python {' '.join(shlex.quote(arg) for arg in sys.argv)}")


if __name__ == "__main__":
    config = parse_config(BenchConfig, description=__doc__.split("\n\n")[0])
    print_config(config)
    main(config)
