"""Memory plan: peak memory per GPU of one SFT step and one GRPO step for Qwen2.5-VL-3B/7B, 1 and N ranks.

The model is ModelConfig.qwen2_5_vl(size, layers=K): the released checkpoints' widths with random weights (no
download); K cuts the depth so that a CPU can run it. The steps are the trainers' own calls (masked_logprobs,
Engine.generate inside distributed.gathered, completion_logprobs, policy_loss, AdamW) at the paper presets of
vlaa_min/presets.py: SFT micro-batches of 4 x --max-length 2048 tokens; GRPO 512 prompts x G 4 shared by the
ranks, prompts of --max-prompt-length 1024 tokens (SPEC: 1024 / 1024), 1024 new tokens, micro-batches of 8,
beta > 0 (a sharded reference); the rollout runs after one optimizer step (zero gradients), so it holds the
AdamW moments as every rollout from step 2 on does. Each prompt holds one --image-size image. Random weights rarely
emit a stop token, so every completion runs to the budget: the worst case a real rollout can reach.

Each (ranks, gradient checkpointing) pair runs in fresh processes (torchrun for N > 1), one per phase. Reported per
rank, the maximum over ranks: the peak of torch.cuda.max_memory_allocated on GPU; on CPU the peak resident set
(VmHWM, reset before the phase once glibc has returned its freed pages), which also counts the Python process and
the host copy every rank builds before sharding. The GRPO update is timed on --update-micro-batches micro-batches
and scaled to the step's count (mu x rollout rows per rank / micro-batch). A phase that runs out of memory is
reported as OOM.

    python bench/memory.py --size 7b --ranks 8                    # GPU node: the table for 1 and 8 GPUs
    python bench/memory.py --size 3b --layers 2 --vision-depth 2 --vocab-size 8192 --ranks 2 --prompts 2 \\
        --group-size 2 --new-tokens 8 --prompt-length 96 --sft-length 128 --image-size 112   # CPU (docs)
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train_sft.py / train_grpo.py are top-level scripts

import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from vlaa_min import lora  # noqa: E402
from vlaa_min.config import ModelConfig  # noqa: E402
from vlaa_min.generate import Engine, SamplingParams, concat_rollouts  # noqa: E402
from vlaa_min.grpo_loss import policy_loss  # noqa: E402
from vlaa_min.infra import distributed  # noqa: E402
from vlaa_min.infra.runtime import autocast, resolve_dtype  # noqa: E402
from vlaa_min.logprobs import completion_logprobs, masked_logprobs  # noqa: E402
from vlaa_min.model import VLModel  # noqa: E402
from vlaa_min.presets import make_config  # noqa: E402
from vlaa_min.processor import PromptBatch  # noqa: E402
from vlaa_min.rope import mrope_position_ids  # noqa: E402

SFT, GRPO = make_config(train_sft.SFTConfig, "paper"), make_config(train_grpo.GRPOConfig, "paper")
PHASES = ("sft", "grpo")


def synthetic_prompts(config: ModelConfig, count: int, length: int, image_side: int, seed: int) -> PromptBatch:
    """`count` prompts of `length` tokens: <vision_start> one image's tokens <vision_end>, then random text."""
    vision = config.vision
    side = image_side // (vision.patch_size * vision.spatial_merge_size) * vision.spatial_merge_size  # patches
    image_tokens = side * side // vision.spatial_merge_size**2
    if length < image_tokens + 3:
        raise ValueError(f"--prompt-length/--sft-length {length} cannot hold an image of {image_tokens} tokens")
    generator = torch.Generator().manual_seed(seed)
    first_special = min(config.eos_token_id, config.vision_start_token_id, config.image_token_id)
    text = torch.randint(0, first_special, (count, length - image_tokens - 2), generator=generator)
    head = torch.tensor([config.vision_start_token_id] + [config.image_token_id] * image_tokens
                        + [config.vision_end_token_id])
    input_ids = torch.cat([head.expand(count, -1), text], dim=1)  # (B, T)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    grid = torch.tensor([[1, side, side]] * count)  # (I, 3)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return PromptBatch(input_ids=input_ids, attention_mask=mask,
                       position_ids=mrope_position_ids(input_ids, mask, grid, image_token_id=config.image_token_id,
                                                       spatial_merge_size=vision.spatial_merge_size),
                       pixel_values=torch.randn(count * side * side, patch_dim, generator=generator),
                       image_grid_thw=grid, prompt_lengths=torch.full((count,), length))


def model_config(args) -> ModelConfig:
    config = ModelConfig.qwen2_5_vl(args.size, layers=args.layers, vision_depth=args.vision_depth)
    if args.vocab_size:  # a CPU-sized vocabulary: the special tokens move to its top
        config.text.vocab_size = args.vocab_size
        (config.eos_token_id, config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
         config.video_token_id) = range(args.vocab_size - 5, args.vocab_size)
    return config


def select(batch: PromptBatch, rows: torch.Tensor) -> PromptBatch:
    """The prompts `rows` of a synthetic batch (one image of the same size each)."""
    patches = batch.pixel_values.shape[0] // batch.input_ids.shape[0]
    pixels = batch.pixel_values.view(batch.input_ids.shape[0], patches, -1)[rows].flatten(0, 1)
    return PromptBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[:, rows], pixels,
                       batch.image_grid_thw[rows], batch.prompt_lengths[rows])


def build(args, device: torch.device, dtype: torch.dtype = torch.float32) -> VLModel:
    """A random-weight model, the vision tower frozen (the paper), sharded over the ranks."""
    torch.manual_seed(0)
    model = VLModel(model_config(args))
    model.visual.requires_grad_(False)
    model.gradient_checkpointing = args.gradient_checkpointing
    model.to(dtype)
    if args.lora_rank:  # LoRA: a frozen base (bf16 on a GPU) and fp32 adapters; the reference is not built
        model.to(lora.base_dtype(args.lora_rank, device))
        lora.apply_lora(model, args.lora_rank, 2.0 * args.lora_rank, 0.0, lora.DEFAULT_TARGETS)
    if distributed.is_distributed():
        return distributed.shard(model, device)  # shards go to the device unit by unit
    return model.to(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # glibc keeps freed heap pages resident (the last phase's tensors); hand them back first, so that the
        # peak starts from live memory as max_memory_allocated's does on a GPU
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
            f.write("5")


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20


def sft_phase(args, device, precision) -> dict:
    model = build(args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=SFT.lr, betas=(0.9, 0.95))
    batch = synthetic_prompts(model.config, args.sft_micro, args.sft_length, args.image_size, seed=1).to(device)
    targets = torch.arange(args.sft_length, device=device)[None, :] >= args.sft_length // 2  # the response half
    reset_peak(device)
    started = time.perf_counter()
    with autocast(device, precision):
        logp = masked_logprobs(model, batch.input_ids, batch.position_ids, batch.attention_mask,
                               targets.expand(args.sft_micro, -1), batch.pixel_values, batch.image_grid_thw)
    (-logp.sum() / targets.sum()).backward()
    torch.nn.utils.clip_grad_norm_(trainable, SFT.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"sft_gib": peak_gib(device), "sft_micro_s": time.perf_counter() - started}


def grpo_phase(args, device, precision) -> dict:
    policy = build(args, device)
    if args.lora_rank:  # the reference is the policy with its adapters off
        reference = policy
    else:
        reference = build(args, device, dtype=precision)  # frozen, in compute precision like train_grpo's
        reference.requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=GRPO.lr, betas=(0.9, 0.95))
    prompts = synthetic_prompts(policy.config, args.prompts // distributed.world_size(), args.prompt_length,
                                args.image_size, seed=2 + distributed.rank()).to(device)
    engine = Engine(policy, pad_token_id=0)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=GRPO.temperature,
                              stop_token_ids=(policy.config.eos_token_id,),
                              banned_token_ids=(policy.config.image_token_id,))
    generator = torch.Generator(device=device).manual_seed(distributed.rank())
    # one optimizer step (zero gradients) first: every rollout from step 2 on holds the AdamW moments
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result = {}
    reset_peak(device)
    started = time.perf_counter()
    count = len(prompts.input_ids)
    with distributed.gathered(policy), lora.rollout_weights(policy, "merged"), autocast(device, precision):
        parts = [engine.generate(select(prompts, rows), args.group_size, sampling, generator).to("cpu")
                 for rows in train_grpo.chunks(torch.arange(count), args.rollout_batch_size or count)]
    rollout = concat_rollouts(parts, pad_token_id=0).to(device)
    result |= {"rollout_gib": peak_gib(device), "rollout_s": time.perf_counter() - started}

    reset_peak(device)
    started, rows = time.perf_counter(), torch.arange(len(rollout.completion_lengths), device=device)
    micro_batches = [rows[i : i + args.grpo_micro] for i in range(0, len(rows), args.grpo_micro)]
    for micro in micro_batches[: args.update_micro_batches]:
        distinct, prompt_rows = torch.unique(rollout.prompt_index[micro], return_inverse=True)  # each prompt once
        ids, lengths = rollout.completion_ids[micro], rollout.completion_lengths[micro]
        mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        with torch.no_grad(), autocast(device, precision), lora.adapters_off(reference):
            ref, _ = completion_logprobs(reference, select(prompts, distinct), ids, lengths, GRPO.temperature,
                                         prompt_rows=prompt_rows)
        with autocast(device, precision):
            logp, _ = completion_logprobs(policy, select(prompts, distinct), ids, lengths, GRPO.temperature,
                                          with_entropy=True, prompt_rows=prompt_rows)
        loss, _ = policy_loss(logp, rollout.logprobs[micro], torch.randn(len(micro), device=device), mask,
                              clip_low=GRPO.clip_low, clip_high=GRPO.clip_high, aggregation=GRPO.loss_aggregation,
                              normaliser=float(len(rows)), beta=GRPO.kl_init, ref_logp=ref.float())
        loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, GRPO.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timed = min(args.update_micro_batches, len(micro_batches))
    result |= {"update_gib": peak_gib(device),
               "update_s": (time.perf_counter() - started) / timed * GRPO.mu * len(micro_batches)}
    return result


def worker(args) -> None:
    device = distributed.setup(args.device)
    precision = resolve_dtype("auto", device)
    try:
        result = (sft_phase if args.phase == "sft" else grpo_phase)(args, device, precision)
    except torch.OutOfMemoryError:
        result = {"oom": True}
    rows = distributed.all_gather_objects(result)
    if distributed.is_main():
        Path(args.result).write_text(json.dumps(rows))
    distributed.shutdown()


def run_case(args, ranks: int, checkpointing: bool) -> dict:
    """One (ranks, gradient checkpointing) case: each phase in fresh processes; the maximum over ranks."""
    merged = {}
    for phase in PHASES:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            flags = [a for a in sys.argv[1:] if a not in ("--gradient-checkpointing",)]
            worker_args = [str(Path(__file__).resolve()), *flags, "--phase", phase, "--result", result.name]
            worker_args += ["--gradient-checkpointing"] if checkpointing else []
            launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", str(ranks)]
            subprocess.run(launcher + worker_args, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            rows = json.loads(Path(result.name).read_text())
        for key in set(rows[0]) - {"oom"}:
            if all(key in row for row in rows):  # a rank that ran out of memory has none: the cell says OOM
                merged[key] = max(row[key] for row in rows)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["3b", "7b"], default="3b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default: the model's)")
    parser.add_argument("--vocab-size", type=int, default=None, help="a smaller vocabulary (CPU; default: real)")
    parser.add_argument("--ranks", type=int, default=8, help="the N of the '1 and N ranks' comparison")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=GRPO.prompts_per_step, help="prompts per rollout, all ranks")
    parser.add_argument("--rollout-batch-size", type=int, default=0, help="prompts per engine call (0 = all)")
    parser.add_argument("--group-size", type=int, default=GRPO.group_size)
    parser.add_argument("--new-tokens", type=int, default=GRPO.max_new_tokens)
    parser.add_argument("--prompt-length", type=int, default=GRPO.max_prompt_length)
    parser.add_argument("--grpo-micro", type=int, default=GRPO.micro_batch_size)
    parser.add_argument("--sft-length", type=int, default=SFT.max_length)
    parser.add_argument("--sft-micro", type=int, default=SFT.micro_batch_size)
    parser.add_argument("--image-size", type=int, default=448, help="side of each prompt's square image (pixels)")
    parser.add_argument("--update-micro-batches", type=int, default=2, help="micro-batches timed in the update")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA on the decoder (0 = full fine-tuning)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # set for the worker processes
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return worker(args)
    if args.prompts % args.ranks:
        raise SystemExit(f"--prompts {args.prompts} must be a multiple of --ranks {args.ranks}")
    print(f"| Qwen2.5-VL-{args.size} layers {args.layers or 'all'} | ranks | grad ckpt | SFT step GiB | "
          f"rollout GiB | GRPO update GiB | rollout s | update s |\n|---|---|---|---|---|---|---|---|")
    for ranks in (1, args.ranks):
        for checkpointing in (False, True):
            r = run_case(args, ranks, checkpointing)
            cells = [f"{r[k]:.2f}" if k in r else "OOM" for k in ("sft_gib", "rollout_gib", "update_gib")]
            times = [f"{r[k]:.1f}" if k in r else "-" for k in ("rollout_s", "update_s")]
            print(f"| | {ranks} | {'on' if checkpointing else 'off'} | " + " | ".join(cells + times) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
