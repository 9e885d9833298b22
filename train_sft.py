"""Supervised fine-tuning of a Qwen2-VL / Qwen2.5-VL model on reasoning traces (the paper's SFT stage).

Objective: for each sample (image, question, response = "<think>...</think><answer>...</answer>"), the negative
log-likelihood of the response tokens and of the <|im_end|> that closes the assistant turn, given the system
prompt, the image and the question:

    loss = - sum_{samples, assistant tokens t} log p(y_t | y_<t, image, question) / (number of assistant tokens)

averaged over every assistant token of the optimizer batch (not per micro-batch), so gradient accumulation gives
the same update as one large batch. System, user, image and role-header tokens are masked (the mask comes from
the processor's token boundaries, never from comparing ids). Padding comes from lengths. The leading tokens every
sample of a micro-batch shares (the system prompt) run once (vlaa_min.logprobs.masked_logprobs): same loss and
gradients, fewer tokens.

Paper vs here: the paper trains on VLAA-Thinking-SFT-126K with a frozen vision encoder, global batch 128, ~1 epoch,
learning rate not reported. The same defaults apply here where they fit (--freeze-vision true); the learning rate,
schedule (cosine, warmup 3%, floor 0.1 x peak: the GRPO stage's shape) and batch sizes are ours. On the toy world
the vision tower is trained (`make base` starts from random weights, so nothing could see otherwise).

Runs:
    make base                       # toy "instruct" base from a fresh tiny model (preset toy-base)
    make sft  [TRACES=pseudo]       # SFT on the toy reasoning traces, starting from the base
    python train_sft.py --model runs/base/model --data toy/sft.json --images toy/images --out runs/sft
    python train_sft.py --preset paper --model Qwen2.5-VL-3B-Instruct --data VLAA-Thinking-SFT-126K.json \
        --images images --out runs/sft-3b
Resume with the same command plus --resume true; on N GPUs (FSDP2, each rank a share of the batch): NPROC=N.
--lora-rank R trains LoRA adapters on the decoder instead (vlaa_min/lora.py); checkpoints then hold the adapter.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
from vlaa_min import lora
from vlaa_min.infra import distributed
from vlaa_min.infra.cli import ConfigError, check_sizes, print_config, run_script
from vlaa_min.infra.run_folder import (check_finite, check_model_dir, check_out_folder, file_sha256, on_rank_0,
                                       open_run, release_lock)
from vlaa_min.infra.runtime import autocast, resolve_dtype, seed_everything
from vlaa_min.infra.train_state import resume_training, save_checkpoint, save_model
from vlaa_min.logprobs import masked_logprobs
from vlaa_min.metrics import MetricsLogger
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor
from vlaa_min.schedule import cosine_with_warmup

# Settings a resumed run may change: they do not shape training (the rest must equal the checkpoint's).
RESUME_SAFE = frozenset({"eval_every", "save_every", "device", "compile", "gradient_checkpointing", "skip_bad"})


@dataclass
class SFTConfig:
    model: str = field(default="runs/toy-init", metadata={"help": "HF-format checkpoint directory to start from"})
    data: str = field(default="toy/sft.json", metadata={"help": "SFT records, VLAA-Thinking JSON or JSONL"})
    images: str = field(default="toy/images", metadata={"help": "root that the records' image paths are relative to"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out records for the eval loss (default: "
                                                                   "the last --eval-size records of --data)"})
    eval_size: int = field(default=64, metadata={"help": "records held out from --data when --eval-data is none"})
    out: str = field(default="runs/sft", metadata={"help": "run directory (metrics, checkpoints, final model)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (used when --steps is 0)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = derived from --epochs"})
    batch_size: int = field(default=32, metadata={"help": "samples per optimizer step (paper: 128)"})
    micro_batch_size: int = field(default=8, metadata={"help": "samples per forward/backward"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps with linear warmup"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of the peak"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)"})
    max_length: int = field(default=2048, metadata={"help": "max tokens per sample (prompt + response)"})
    max_pixels: int = field(default=0, metadata={"help": "cap on an image's resized area (0 = the model's "
                                                         "preprocessor_config.json); 28*28*N: at most N image tokens"})
    freeze_vision: bool = field(default=True, metadata={"help": "freeze the vision tower (the paper does)"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank r on the decoder (0 = full fine-tuning)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale alpha: the update is (alpha / r) B A"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_targets: str = field(default=lora.DEFAULT_TARGETS, metadata={"help": "decoder linears LoRA adapts"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (opt-in)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    precision: str = field(default="auto", metadata={"help": "autocast dtype: auto (bf16 on GPU, fp32 on CPU), "
                                                            "fp32, bf16"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order"})
    eval_every: int = field(default=50, metadata={"help": "held-out loss every N steps (0 = only at the end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    overwrite: bool = field(default=False, metadata={"help": "delete what --out holds and start again"})
    skip_bad: bool = field(default=False, metadata={"help": "skip invalid records (reported) instead of failing"})
    truncate: bool = field(default=False, metadata={"help": "cut the answers of samples longer than --max-length to "
                                                            "fit (counted at start) instead of refusing them"})

    def __post_init__(self):
        check_sizes(self, positive=("epochs", "batch_size", "micro_batch_size", "lr", "max_length"),
                    non_negative=("steps", "eval_size", "max_pixels", "warmup_ratio", "min_lr_ratio", "weight_decay",
                                  "grad_clip", "eval_every", "save_every"))
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                             f"{self.micro_batch_size}")
        lora.check_flags(self)


def sft_loss_sum(model, batch, device, precision) -> tuple[torch.Tensor, int]:
    """Summed NLL over the assistant tokens of one micro-batch, and how many there were."""
    batch = batch.to(device)
    with autocast(device, precision):
        logp = masked_logprobs(model, batch.input_ids, batch.position_ids, batch.attention_mask, batch.loss_mask,
                               batch.pixel_values, batch.image_grid_thw)  # (B, T); the system prompt runs once
    return -logp.sum(), int(batch.loss_mask.sum())


@torch.no_grad()
def held_out_loss(model, records, processor, cfg, device, precision) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(records), cfg.micro_batch_size):
        batch = data.collate_sft(records[start : start + cfg.micro_batch_size], processor, cfg.images, cfg.max_length)
        loss_sum, n = sft_loss_sum(model, batch, device, precision)
        total, tokens = total + loss_sum.item(), tokens + n
    model.train()
    return total / max(tokens, 1)


def main(cfg: SFTConfig) -> str:
    device = distributed.setup(cfg.device)  # [distributed] joins torchrun's job if there is one
    rank, world = distributed.rank(), distributed.world_size()  # one process: 0, 1
    print_config(cfg)
    on_rank_0(check_out_folder, cfg.out, cfg.resume, cfg.overwrite)  # under torchrun: every rank stops
    check_model_dir(cfg.model)
    if cfg.lora_rank:
        lora.check_targets(cfg.model, cfg.lora_targets)  # before any weight is read
    seed_everything(cfg.seed)
    precision = resolve_dtype(cfg.precision, device)
    if cfg.batch_size % (cfg.micro_batch_size * world):  # [distributed] each rank: whole micro-batches
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
                          f"{cfg.micro_batch_size} x {world} processes")

    # --- data: everything is validated before the first step
    processor = Processor.from_pretrained(cfg.model, cfg.max_pixels)

    def load(path: str) -> list[dict]:
        records = data.load_records(path, cfg.images, require_answer=True, skip_bad=cfg.skip_bad)
        return data.check_sft_lengths(records, path, processor, cfg.images, cfg.max_length, "--max-length",
                                      skip_bad=cfg.skip_bad, truncate=cfg.truncate)

    records = load(cfg.data)
    if cfg.eval_data:
        eval_records = load(cfg.eval_data)
    else:
        if not 0 < cfg.eval_size <= len(records) // 2:
            raise ConfigError(f"--eval-size {cfg.eval_size}: hold out 1 to {len(records) // 2} (half) of the "
                              f"{len(records)} records of {cfg.data}, or give --eval-data")
        records, eval_records = records[: -cfg.eval_size], records[-cfg.eval_size :]
    steps_per_epoch = len(records) / cfg.batch_size
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    accumulation = cfg.batch_size // cfg.micro_batch_size // world  # micro-batches per rank
    print(f"{len(records)} training records, {len(eval_records)} held out; {total_steps} steps of {cfg.batch_size} "
          f"({accumulation} x {cfg.micro_batch_size})")

    # --- model, optimizer, schedule
    # fp32 master weights; with LoRA a frozen base (bf16 on a GPU) and fp32 adapters, the only ones that train
    model = VLModel.from_pretrained(cfg.model, dtype=lora.base_dtype(cfg.lora_rank, device), device=device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.freeze_vision:
        model.visual.requires_grad_(False)
    if cfg.lora_rank:
        lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, base=cfg.model)
        print(lora.describe(model))
    distributed.shard(model, device)  # [distributed] FSDP2; a no-op in one process
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable) / 1e6:.2f}M of "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = cosine_with_warmup(optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    sampler = data.EpochSampler(len(records), seed=cfg.seed, rank=rank, world_size=world)
    forward = torch.compile(model) if cfg.compile else model

    # --- the run folder: created only now that the inputs check out
    settings = dataclasses.asdict(cfg) | {"data_sha256": file_sha256(cfg.data),
                                          "eval_data_sha256": file_sha256(cfg.eval_data)}
    lock, resumed = open_run(cfg.out, settings, resume=cfg.resume, overwrite=cfg.overwrite, safe=RESUME_SAFE)
    start_step = resume_training(*resumed, model, optimizer, scheduler, sampler)["step"] if resumed else 0
    metrics = MetricsLogger(os.path.join(cfg.out, "metrics.jsonl"), resume_step=start_step if resumed else None)

    def save(step: int) -> None:
        save_checkpoint(cfg.out, step, model, processor, {
            "optimizer": distributed.optimizer_state(model, optimizer), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "settings": settings})

    # --- train
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="sft",
                    dynamic_ncols=True, disable=not distributed.is_main())
    for step in progress:
        started = time.perf_counter()
        micro_batches = [data.collate_sft([records[i] for i in sampler.next_batch(cfg.micro_batch_size * world)],
                                          processor, cfg.images, cfg.max_length) for _ in range(accumulation)]
        # Normalise by the assistant tokens of the whole optimizer batch, so accumulation is exact.
        batch_tokens = distributed.all_reduce_sum(sum(int(b.loss_mask.sum()) for b in micro_batches))
        loss_total = 0.0
        for batch in micro_batches:
            loss_sum, _ = sft_loss_sum(forward, batch, device, precision)
            loss = loss_sum / max(batch_tokens, 1)
            loss.backward()
            loss_total += loss.item()
        loss_total = distributed.all_reduce_sum(loss_total)  # [distributed] each rank holds its share of the loss
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = distributed.full_norm(grad_norm)
        check_finite(step + 1, cfg.out, loss=loss_total, grad_norm=float(grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        elapsed = time.perf_counter() - started
        all_tokens = distributed.all_reduce_sum(sum(int(b.lengths.sum()) for b in micro_batches))
        row = {"step": step + 1, "loss": loss_total, "grad_norm": float(grad_norm), "lr": lr,
               "tokens_per_s": all_tokens / elapsed, "step_time_s": elapsed, "epoch": sampler.epoch,
               "truncated": distributed.all_reduce_sum(sum(int(b.truncated.sum()) for b in micro_batches))
                             / cfg.batch_size}
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total_steps:
            row["eval_loss"] = held_out_loss(forward, eval_records, processor, cfg, device, precision)
            tqdm.write(f"step {step + 1}: train loss {loss_total:.4f}, held-out loss {row['eval_loss']:.4f}")
        metrics.log(row)
        progress.set_postfix(loss=f"{loss_total:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             **({"eval": f"{row['eval_loss']:.3f}"} if "eval_loss" in row else {}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            save(step + 1)

    # --- final model: a checkpoint (resumable) and a plain model directory for the next stage
    save(total_steps)
    final_dir = os.path.join(cfg.out, "model")
    save_model(final_dir, model, processor)
    release_lock(lock)
    print(f"model written to {final_dir}; metrics in {metrics.path}")
    return final_dir


if __name__ == "__main__":
    run_script(main, SFTConfig, __doc__)
