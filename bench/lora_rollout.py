"""LoRA rollouts: the engine through the unmerged adapters vs with them merged into the weights (lora.merged).

The model is bench/generate.py's: `--config tiny` (the toy's 1M-parameter Qwen2.5-VL) or a real model's widths
(`--layers K` cuts the depth), random weights, random adapters on every decoder linear (rank --rank). One rollout
is --prompts prompts x --samples G, exactly --new-tokens each (no stop token), as train_grpo.py runs it. The
two modes alternate call by call (so load on a shared machine hits both alike); the median of --repeats timings
is reported, the merged one including its merge and restore. Also the largest |log-prob| difference between the
two modes' sampled tokens under the same generator (fp32: rounding only).

    python bench/lora_rollout.py                                              # toy, CPU: 32 x 8 x 96 tokens
    python bench/lora_rollout.py --config qwen2.5-vl-3b --new-tokens 512 --prompts 16 --device cuda   # GPU, bf16
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from generate import BenchConfig, make_prompts, model_config_for  # noqa: E402  (bench/generate.py)

from vlaa_min import lora  # noqa: E402
from vlaa_min.generate import Engine, SamplingParams  # noqa: E402
from vlaa_min.infra.runtime import autocast  # noqa: E402
from vlaa_min.model import VLModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config_for(BenchConfig(config=args.config, layers=args.layers))
    torch.manual_seed(0)
    with torch.device(device):
        model = VLModel(config).to(precision).eval()
    lora.apply_lora(model, args.rank, 2.0 * args.rank, 0.0, lora.DEFAULT_TARGETS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.02)  # trained adapters: B no longer 0
    print(lora.describe(model))
    batch = make_prompts(config, args.prompts, seed=0).to(device)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    engine = Engine(model, pad_token_id=config.pad_token_id)

    def rollout(mode: str):
        generator = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad(), lora.rollout_weights(model, mode), autocast(device, precision):
            return engine.generate(batch, args.samples, params, generator)

    times = {mode: [] for mode in lora.ROLLOUT_MODES}
    for mode in lora.ROLLOUT_MODES:
        rollout(mode)  # warm-up
    for _ in range(args.repeats):
        for mode in lora.ROLLOUT_MODES:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            rollout(mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - started)
    tokens = args.prompts * args.samples * args.new_tokens
    for mode, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{mode:>8}: {median:.3f} s per rollout, {tokens / median:,.0f} tokens/s (median of {args.repeats})")
    merged, unmerged = rollout("merged"), rollout("adapters")
    same = torch.equal(merged.completion_ids, unmerged.completion_ids)
    drift = (merged.logprobs - unmerged.logprobs).abs().max().item() if same else float("nan")
    print(f"same tokens: {same}; max |log-prob difference|: {drift:.2e}")


if __name__ == "__main__":
    main()
