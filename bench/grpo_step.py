"""Time per GRPO step: our train_grpo.py against TRL's GRPOTrainer, same model, data, G, batch and lengths.

Both trainers run one after the other in this one process (same torch, threads and machine state), on:
- the same checkpoint: a tiny random-init Qwen2.5-VL (ModelConfig.tiny) with the toy tokenizer, built once by
  vlaa_min.toy_model under --out; our save_pretrained is HF format, so transformers loads it for TRL;
- the same prompts in the same order (our EpochSampler's; TRL's dataset with shuffle off), with the paper's
  system prompt (checked on the first record: TRL's processor yields exactly our prompt ids and pixels);
- the same reward (rewards.compute_rewards as a TRL reward function);
- the same GRPO: G samples, --new-tokens, temperature, top-p 1, the same stop tokens, fixed beta (k3 KL to a
  frozen reference), clip 0.2, per-sequence token mean (TRL loss_type "grpo"), std-scaled advantages, all P x G
  rollouts in one update of micro-batches of --micro-batch-size, the whole model trained, AdamW, grad clip 1,
  CPU, fp32, no gradient checkpointing, no vLLM, no eval.
Timing: ours = time_generate + time_reward + time_train of each step in metrics.jsonl; TRL = on_step_begin ->
on_step_end of a TrainerCallback (TRL fetches the step's batches before on_step_begin, so the table also gives
its on_step_end -> on_step_end interval). Each side runs --warmup steps first; the median of the --steps that
follow is reported. One torch thread by default: on a shared CPU a second thread stalls whenever another process
holds a core. TRL's processor is built in memory and handed to the trainer; our run ends by writing its final
checkpoint and plot, after the timed steps.

Runs in the bench venv (bench/README.md), never in the project's: TRL is a bench-only dependency.
    .venv-bench/bin/python bench/grpo_step.py
    .venv-bench/bin/python bench/grpo_step.py --prompts 16 --group-size 4 --new-tokens 128 --threads 2
"""

import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train_grpo.py, data.py, rewards/ and toyworld.py are top-level scripts

import data  # noqa: E402
import rewards  # noqa: E402
import toyworld  # noqa: E402
import train_grpo  # noqa: E402
from vlaa_min.infra.cli import parse_config, print_config  # noqa: E402
from vlaa_min.metrics import read_metrics  # noqa: E402
from vlaa_min.processor import SYSTEM_PROMPT, Processor  # noqa: E402
from vlaa_min.toy_model import build_toy_checkpoint  # noqa: E402

try:
    import datasets
    import transformers
    import trl
    from transformers import AutoProcessor, PrinterCallback, Qwen2_5_VLForConditionalGeneration, TrainerCallback
except ImportError as error:
    sys.exit(f"bench/grpo_step.py needs the bench venv (TRL, torchvision): see bench/README.md ({error})")


@dataclass
class BenchConfig:
    prompts: int = field(default=8, metadata={"help": "P, prompts per GRPO step"})
    group_size: int = field(default=8, metadata={"help": "G, samples per prompt"})
    new_tokens: int = field(default=64, metadata={"help": "max new tokens per sample"})
    micro_batch_size: int = field(default=32, metadata={"help": "samples per forward/backward (TRL: "
                                                                "per_device_train_batch_size)"})
    steps: int = field(default=8, metadata={"help": "timed steps per trainer (median reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps per trainer before the timed ones"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (paper: 0.8)"})
    beta: float = field(default=0.04, metadata={"help": "fixed KL coefficient (a frozen reference on both sides)"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (no effect on time; the same on both sides)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0 = torch's default; 1 keeps a shared CPU "
                                                      "from stalling multi-threaded ops, see bench/README.md)"})
    seed: int = field(default=0, metadata={"help": "world, weights, data order and sampling seed"})
    out: str = field(default="runs/bench/grpo_step", metadata={"help": "toy world, checkpoint and both runs"})

    def __post_init__(self):
        rollouts = self.prompts * self.group_size
        if rollouts % self.micro_batch_size:
            raise ValueError(f"--prompts x --group-size = {rollouts} must be a multiple of --micro-batch-size "
                             f"{self.micro_batch_size} (one optimizer update per step on both sides)")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")


def prepare_checkpoint(out: Path, seed: int) -> tuple[Path, Path]:
    """(world dir, model dir): a toy world with an RL split and a random tiny Qwen2.5-VL, built once and reused."""
    world, model = out / "toy", out / "model"
    if not (world / "world.json").exists():
        toyworld.build_world(str(world), sizes={"base": 0, "sft": 0, "rl": 500, "test": 0}, seed=seed)
    if not (model / "config.json").exists():
        build_toy_checkpoint(str(model), str(world), seed=seed)
    return world, model


# ----------------------------------------------------------------------------------------------------------------
# Ours


def run_ours(cfg: BenchConfig, world: Path, model: Path) -> dict:
    """Per-step seconds (whole step, sampling) and completion lengths from our metrics.jsonl (warm-up dropped)."""
    ours_cfg = ours_config(cfg, world, model)
    train_grpo.main(ours_cfg)
    rows = read_metrics(os.path.join(ours_cfg.out, "metrics.jsonl"))[cfg.warmup :]
    return {
        "step": [r["time_generate"] + r["time_reward"] + r["time_train"] for r in rows],
        "generate": [r["time_generate"] for r in rows],
        "completion_length": [r["completion_length"] for r in rows],
    }


def ours_config(cfg: BenchConfig, world: Path, model: Path) -> train_grpo.GRPOConfig:
    rollouts = cfg.prompts * cfg.group_size
    return train_grpo.GRPOConfig(
        model=str(model), data=str(world / "rl.json"), images=str(world / "images"), eval_data=None,
        out=os.path.join(cfg.out, "ours"), steps=cfg.warmup + cfg.steps, prompts_per_step=cfg.prompts,
        group_size=cfg.group_size, temperature=cfg.temperature, max_new_tokens=cfg.new_tokens,
        train_batch_size=rollouts, micro_batch_size=cfg.micro_batch_size, lr=cfg.lr, kl_init=cfg.beta,
        kl_target=0.0, freeze_vision=False, device="cpu", precision="fp32", save_every=0, sample_every=0,
        seed=cfg.seed)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# TRL


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step: on_step_begin -> on_step_end, and on_step_end -> on_step_end."""

    def __init__(self):
        self.inside, self.between = [], []
        self.begin = self.last_end = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.inside.append(now - self.begin)
        if self.last_end is not None:
            self.between.append(now - self.last_end)
        self.last_end = now


def time_generate_calls(model, seconds: list[float]) -> None:
    """Append the wall seconds of every model.generate call (TRL's rollout) to `seconds`."""
    generate = model.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        output = generate(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return output

    model.generate = timed_generate


def trl_processor(model: Path):
    """transformers' Qwen2.5-VL processor on our checkpoint (AutoProcessor finds no chat template of its own)."""
    processor = AutoProcessor.from_pretrained(str(model), padding_side="left")
    processor.chat_template = processor.tokenizer.chat_template  # our checkpoint keeps it in the tokenizer only
    return processor


def check_same_prompt(processor, ours: Processor, record: dict, images: Path) -> None:
    """TRL renders conversational prompts with the processor's chat template: it must give our ids and pixels."""
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "image", "image": data.load_image(images, record["image"])},
                                             {"type": "text", "text": record["question"]}]}]  # fmt: skip
    theirs = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)  # fmt: skip
    expected = data.encode_prompt(record, ours, images)
    if list(theirs["input_ids"][0]) != expected.input_ids:
        raise RuntimeError(f"record {record['id']}: TRL's processor renders other prompt ids than ours")
    if not torch.allclose(torch.as_tensor(theirs["pixel_values"]), expected.pixel_values, atol=1e-5):
        raise RuntimeError(f"record {record['id']}: TRL's processor gives other pixel values than ours")


def trl_dataset(records: list[dict], order: list[int], images: Path) -> "datasets.Dataset":
    """Conversational prompts in our sampler's order; the image goes into the user turn (TRL inserts it)."""
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": records[i]["question"]}],
         "image": data.load_image(images, records[i]["image"]),
         "record_index": i}
        for i in order
    ])  # fmt: skip


def make_reward_function(records: list[dict], config: "rewards.RewardConfig"):
    """rewards.compute_rewards as a TRL reward function; records travel as indices (their meta is nested)."""

    def vlaa_mixed_reward(completions, record_index, **kwargs) -> list[float]:
        texts = [completion[-1]["content"] for completion in completions]  # conversational: the assistant turn
        scored = rewards.compute_rewards(texts, [records[i] for i in record_index], config=config)
        return [s["reward"] for s in scored]

    return vlaa_mixed_reward


def run_trl(cfg: BenchConfig, world: Path, model: Path) -> dict:
    """Per-step seconds (both windows) and completion lengths of TRL's GRPOTrainer (warm-up steps dropped)."""
    ours_cfg = ours_config(cfg, world, model)
    records = data.load_records(ours_cfg.data, ours_cfg.images)
    ours = Processor.from_pretrained(model)
    processor = trl_processor(model)
    check_same_prompt(processor, ours, records[0], world / "images")

    total_steps = cfg.warmup + cfg.steps
    order = data.EpochSampler(len(records), seed=cfg.seed).next_batch(cfg.prompts * total_steps)
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model), dtype=torch.float32)
    policy.generation_config.eos_token_id = list(ours.stop_token_ids)  # TRL ends completions at these, as ours
    rollouts = cfg.prompts * cfg.group_size
    args = trl.GRPOConfig(
        output_dir=os.path.join(cfg.out, "trl"), max_steps=total_steps, seed=cfg.seed,
        per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=rollouts // cfg.micro_batch_size,
        num_generations=cfg.group_size, max_completion_length=cfg.new_tokens, temperature=cfg.temperature,
        top_p=1.0, top_k=0, generation_kwargs={"suppress_tokens": list(ours.vision_token_ids)},
        beta=cfg.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1,
        learning_rate=cfg.lr, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        use_cpu=True, bf16=False, activation_checkpointing=False, shuffle_dataset=False, dataloader_num_workers=0,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    timer, generate_seconds = StepTimer(), []
    time_generate_calls(policy, generate_seconds)
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=make_reward_function(records, train_grpo.reward_config(ours_cfg)), args=args,
        train_dataset=trl_dataset(records, order, world / "images"), processing_class=processor,
        callbacks=[timer])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # its per-step log lines would bury the table
    trainer.train()
    logged = [row for row in trainer.state.log_history if "completions/mean_length" in row][cfg.warmup :]
    return {
        "step": timer.inside[cfg.warmup :],
        "step_end_to_end": timer.between[max(cfg.warmup - 1, 0) :],
        "generate": generate_seconds[cfg.warmup :],
        "completion_length": [row["completions/mean_length"] for row in logged],
    }


# ----------------------------------------------------------------------------------------------------------------
# Report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    world, model = prepare_checkpoint(Path(cfg.out), cfg.seed)
    load_before = os.getloadavg()
    ours = run_ours(cfg, world, model)
    load_between = os.getloadavg()
    theirs = run_trl(cfg, world, model)
    load_after = os.getloadavg()
    if torch.get_num_threads() != threads:
        print(f"warning: torch threads changed from {threads} to {torch.get_num_threads()} during the TRL run")

    n_params = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model)).parameters())
    rollouts = cfg.prompts * cfg.group_size
    print(f"\n{cfg.prompts} prompts x G={cfg.group_size} = {rollouts} rollouts per step, <= {cfg.new_tokens} new "
          f"tokens, temperature {cfg.temperature}, beta {cfg.beta}, one optimizer update per step in micro-batches "
          f"of {cfg.micro_batch_size}; tiny random Qwen2.5-VL ({n_params / 1e6:.2f}M parameters), 112x112 images; "
          f"CPU, {threads} threads, fp32; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}; median of {cfg.steps} steps after {cfg.warmup} warm-up; load average (1 min) "
          f"{load_before[0]:.2f} before, {load_between[0]:.2f} between, {load_after[0]:.2f} after\n")  # fmt: skip
    # "sampling": ours times the step's data loading, image encoding and Engine.generate; TRL's model.generate
    ours_s, trl_s = median(ours["step"]), median(theirs["step"])
    print("| trainer | s/step | ours / TRL | sampling s | rest of the step s | mean completion tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, times, seconds in (("vlaa-min train_grpo.py", ours, ours_s), ("TRL GRPOTrainer", theirs, trl_s)):
        sampling = median(times["generate"])
        print(f"| {name} | {seconds:.3f} | {seconds / trl_s:.2f} | {sampling:.3f} | {seconds - sampling:.3f} "
              f"| {median(times['completion_length']):.1f} |")
    print(f"\nTRL on_step_end -> on_step_end (its batch fetching and logging included): "
          f"{median(theirs['step_end_to_end']):.3f} s/step")
    print(f"\ncommand: {os.path.relpath(sys.executable)} {' '.join(shlex.quote(arg) for arg in sys.argv)}")


if __name__ == "__main__":
    config = parse_config(BenchConfig, description=__doc__.split("\n")[0])
    print_config(config)
    main(config)
