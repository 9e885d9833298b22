"""Where a rollout's time goes: the engine's decode step and variants of it, and the prefill, side by side.

Each variant changes one part of `Engine._decode_step`. All of them run one after the other, round after round, so
the drift of a shared machine (large on the 2-core CPU) hits them alike: a variant's difference from the full step
is what that part costs. Setup as in bench/generate.py (`--config`, `--layers`: the tiny toy or real Qwen2.5-VL
widths): its prompts prefilled into the engine's cache, G samples per prompt, one token per row, `new_tokens`
generated slots (the step's cost does not depend on how many of them are filled: its shapes are fixed).

  step                 the engine's decode step: decoder, head, sampling at temperature 1
  greedy               argmax instead of sampling                         -> what sampling costs
  decoder only         hidden states, no head and no sampling             -> what head + argmax cost
  G prompt copies      the step over a plain cache holding each prompt's keys/values once per row (what
                       transformers' generate keeps)                      -> what grouped keys/values save
  8 / 1 generated slot the step over 8 or 1 generated slots, not new_tokens -> what attending to them costs
  Python wrapper       compiled with Inductor's Python wrapper, not the C++ one the engine uses on CPU
  no guard check       the step under set_stance(skip_guard_eval_unsafe=True) -> what Dynamo's guard check costs
and three calls outside the step: the vision tower on the batch's images, the decoder over the prompts once (the
engine's prefill), and over each prompt G times (transformers' generate with num_return_sequences=G).

    python bench/decode_step.py      # tiny; 6 compiles the first time (Inductor caches them; docs/speed.md)
    python bench/decode_step.py --config qwen2.5-vl-3b --layers 2 --prompts 1 --compile false --rounds 5
"""

import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from generate import CONFIGS, make_prompts, model_config_for  # bench/generate.py: the rollout bench's setup
from vlaa_min.cache import GroupedKVCache, KVCache
from vlaa_min.generate import Engine, SamplingParams
from vlaa_min.infra.cli import parse_config, print_config
from vlaa_min.model import VLModel


@dataclass
class BenchConfig:
    config: str = field(default="tiny", metadata={"help": f"model widths: {', '.join(CONFIGS)}"})
    layers: int = field(default=0, metadata={"help": "decoder layers (0 = the config's full depth)"})
    vision_depth: int = field(default=0, metadata={"help": "vision blocks (0 = full, or cut like --layers)"})
    compile: bool = field(default=True, metadata={"help": "compile the step variants (false: all eager)"})
    prompts: int = field(default=8, metadata={"help": "prompts per batch"})
    samples: int = field(default=8, metadata={"help": "samples per prompt (G)"})
    new_tokens: int = field(default=64, metadata={"help": "generated slots of the cache"})
    rounds: int = field(default=300, metadata={"help": "timed calls per variant (median reported)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    seed: int = field(default=0, metadata={"help": "weights and prompts seed"})


def decode_inputs(engine: Engine, batch, samples: int, generated_slots: int):
    """The engine's decode cache for `batch` (its prefill), half of the generated slots filled at random, and the
    slot (1,) and position ids (3, N, 1) of the next token: a decode step's inputs halfway through generation."""
    cache, _, next_position = engine._prefill(batch.input_ids, batch.attention_mask, batch.position_ids,
                                              batch.pixel_values, batch.image_grid_thw, samples, generated_slots)
    filled = generated_slots // 2
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    cache.valid[:, :filled] = True
    positions = (next_position + filled).expand(3, -1)[:, :, None]
    return cache, torch.tensor([cache.prompt_len + filled]), positions


def copied_prompt_cache(model: VLModel, cache: GroupedKVCache) -> KVCache:
    """The keys/values of `cache` in transformers' layout: one plain cache row per sample, each holding its
    prompt's keys/values (a copy per row) followed by its generated ones, at the same slots."""
    prompt, group = cache.prompt, cache.group_size
    rows, generated = cache.valid.shape
    plain = KVCache.for_model(model, rows, prompt.max_len + generated)
    for (k, v), (k_prompt, v_prompt), (k_own, v_own) in zip(plain.layers, prompt.layers, cache.layers):
        k.copy_(torch.cat([k_prompt.repeat_interleave(group, dim=0), k_own], dim=2))
        v.copy_(torch.cat([v_prompt.repeat_interleave(group, dim=0), v_own], dim=2))
    plain.valid.copy_(torch.cat([prompt.valid.repeat_interleave(group, dim=0), cache.valid], dim=1))
    return plain


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    config = model_config_for(cfg)
    model = VLModel(config).eval()
    batch = make_prompts(config, cfg.prompts, cfg.seed)
    rows = cfg.prompts * cfg.samples
    sample = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=1.0)
    greedy = SamplingParams(max_new_tokens=cfg.new_tokens, greedy=True)

    engine = Engine(model, config.pad_token_id, compile=cfg.compile)  # its (compiled) step is the "step" variant

    # Distinct functions, so that each compiled variant has its own Dynamo cache entry (entries of one function
    # would be tried one after the other, and the guard check would cost more for some variants than others).
    def greedy_step(tokens, positions, slot, cache, uniform):
        return engine._decode_step(tokens, positions, slot, cache, uniform, greedy)

    def decoder_only(tokens, positions, slot, cache, uniform):
        return model(tokens[:, None], positions, past=cache, cache_position=slot, return_hidden=True)

    def copies_step(tokens, positions, slot, cache, uniform):
        return engine._decode_step(tokens, positions, slot, cache, uniform, sample)

    def eight_slot_step(tokens, positions, slot, cache, uniform):
        return engine._decode_step(tokens, positions, slot, cache, uniform, sample)

    def one_slot_step(tokens, positions, slot, cache, uniform):
        return engine._decode_step(tokens, positions, slot, cache, uniform, sample)

    def python_wrapper_step(tokens, positions, slot, cache, uniform):
        return engine._decode_step(tokens, positions, slot, cache, uniform, sample)

    def compiled(fn, **options):
        return torch.compile(fn, dynamic=False, options=options or None) if cfg.compile else fn

    cpp = {"cpp_wrapper": True}
    variants = {  # name -> (callable, generated slots)
        "step": (lambda *args: engine._step(*args, sample), cfg.new_tokens),
        "greedy": (compiled(greedy_step, **cpp), cfg.new_tokens),
        "decoder only": (compiled(decoder_only, **cpp), cfg.new_tokens),
        f"G = {cfg.samples} prompt copies": (compiled(copies_step, **cpp), cfg.new_tokens),
        "8 generated slots": (compiled(eight_slot_step, **cpp), 8),
        "1 generated slot": (compiled(one_slot_step, **cpp), 1),
    }
    if cfg.compile:
        variants["Python wrapper"] = (compiled(python_wrapper_step), cfg.new_tokens)

    with torch.inference_mode():
        tokens = torch.randint(1 + config.video_token_id, config.text.vocab_size, (rows,))
        uniform = torch.rand(rows)
        calls = {}
        for name, (fn, slots) in variants.items():
            cache, slot, positions = decode_inputs(engine, batch, cfg.samples, slots)
            if name.endswith("prompt copies"):
                cache = copied_prompt_cache(model, cache)
            calls[name] = lambda fn=fn, inputs=(tokens, positions, slot, cache, uniform): fn(*inputs)
        step_call = calls["step"]

        def step_without_guards():
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return step_call()

        if cfg.compile:
            calls["no guard check"] = step_without_guards
        # Outside the step: the images, and the decoder over the prompts (image tokens as text: same cost).
        text_ids = batch.input_ids.masked_fill(batch.input_ids == config.image_token_id, config.pad_token_id)
        copies = dict(input_ids=text_ids.repeat_interleave(cfg.samples, dim=0),
                      position_ids=batch.position_ids.repeat_interleave(cfg.samples, dim=1),
                      attention_mask=batch.attention_mask.repeat_interleave(cfg.samples, dim=0))  # fmt: skip
        calls["vision tower"] = lambda: model.encode_images(batch.pixel_values, batch.image_grid_thw)
        calls["decoder over the prompts once"] = lambda: model(
            text_ids, batch.position_ids, batch.attention_mask, return_hidden=True
        )
        calls[f"decoder over each prompt {cfg.samples} times"] = lambda: model(**copies, return_hidden=True)
        warmups = 10 if config.text.vocab_size < 100_000 else 1
        for name, call in calls.items():  # compile, then warm up
            start = time.perf_counter()
            call()
            print(f"{name}: first call {time.perf_counter() - start:.1f} s", flush=True)
            for _ in range(warmups):
                call()
        seconds = {name: [] for name in calls}  # (wall, this process's CPU) per call
        for _ in range(cfg.rounds):
            for name, call in calls.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                call()
                seconds[name].append((time.perf_counter() - start, time.process_time() - start_cpu))

    median_ms = {name: 1e3 * statistics.median(wall for wall, _ in times) for name, times in seconds.items()}
    cpu_ms = {name: 1e3 * statistics.median(cpu for _, cpu in times) for name, times in seconds.items()}
    print(f"\n{cfg.prompts} prompts x {cfg.samples} samples = {rows} rows, {batch.input_ids.shape[1]}-token prompts, "
          f"{cfg.new_tokens} generated slots; {cfg.config}, {config.text.num_hidden_layers} layers, "
          f"{'compiled' if cfg.compile else 'eager'}; CPU, {torch.get_num_threads()} threads, fp32; "
          f"median of {cfg.rounds} alternated calls\n")  # fmt: skip
    # With one thread the process CPU time leaves out the time other processes held the core.
    print("| variant | ms per call | minus the step's | process CPU ms | minus the step's |")
    print("|---|---:|---:|---:|---:|")
    for name, ms in median_ms.items():
        print(f"| {name} | {ms:.3f} | {ms - median_ms['step']:+.3f} | {cpu_ms[name]:.3f} "
              f"| {cpu_ms[name] - cpu_ms['step']:+.3f} |")
    print(f"\ncommand: python {' '.join(shlex.quote(arg) for arg in sys.argv)}")


if __name__ == "__main__":
    config = parse_config(BenchConfig, description=__doc__.split("\n\n")[0])
    print_config(config)
    main(config)
