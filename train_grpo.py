"""GRPO for vision-language models with the paper's mixed reward: one readable loop.

Each step: rollout -> reward -> advantage -> loss -> update -> log -> eval/save. For every prompt q, G completions
o_1..o_G are sampled at temperature tau from the policy at rollout time (pi_old), each gets a reward r_i in [0, 1]
from rewards.py (a missing or repeated <answer> block scores 0: the implicit format reward). Then, with
pi(o_t) = softmax(logits / tau)[o_t] in every pass (the terms are in vlaa_min/grpo_loss.py):

    A_i  = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-9)                    [advantage]   (--scale-adv-by-std)
    rho  = pi_theta(o_{i,t}) / pi_old(o_{i,t})                                  [ratio]       rollout log-probs
    l    = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)             [clipped PG]  (--clip-low/--clip-high)
         + beta * KL_t(pi_theta || pi_ref)   (k3: exp(d) - d - 1, d = log pi_ref - log pi_theta)  [KL] (--kl-*)
    J    = mean over completions of the mean over their tokens of l            [aggregation] (--loss-aggregation)

A rollout of P prompts x G samples is cut into optimizer batches of --train-batch-size samples (micro-batches
with gradient accumulation; a prompt's samples stay together, so it runs once for all of them), passed over --mu
times; every batch after the first is off-policy, which is what the clip is for. beta follows the paper's adaptive
controller ("KL2": init 1e-3, target 5e-4) or stays fixed (--kl-target 0); --kl-init 0 loads no reference model.

Paper (OpenRLHF) vs here: G = 4, temperature 0.8, 512 prompts per rollout, train batch 256, cosine LR with 3%
warmup to a 5e-7 floor, eps 0.2, 1024 new tokens (the `paper` preset). The toy default shrinks batch and length for
a 2-core CPU, raises the LR and warms up over 10%; clip-higher (DAPO), Dr. GRPO's aggregation, mu > 1 and dropping
zero-variance groups are options, off by default. The vision tower is frozen by default.

    make grpo                                   # toy world, CPU: data + base if missing, then GRPO and eval
    make grpo MODEL=Qwen2.5-VL-3B-Instruct DATA=VLAA-Thinking-GRPO-25K.json IMAGES=images   # add NPROC=N: FSDP2
Resume with the same command plus --resume true. Under torchrun each rank samples its share of the prompts (a
prompt's G samples stay on their rank); normaliser, KL controller and metrics are global (the [distributed] lines).
"""

import copy
import dataclasses
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import eval as evaluation
import rewards
from vlaa_min import distributed
from vlaa_min.cli import ConfigError, check_sizes, print_config, run_script
from vlaa_min.generate import Engine, SamplingParams
from vlaa_min.grpo_loss import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    equal_reward_groups,
    group_advantages,
    loss_normaliser,
    policy_loss,
)
from vlaa_min.logprobs import completion_logprobs
from vlaa_min.metrics import MetricsLogger, plot_curves
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor
from vlaa_min.rollout_log import RolloutLog
from vlaa_min.run import check_finite, check_model_dir, check_out_folder, file_sha256, open_run, release_lock
from vlaa_min.runtime import autocast, resolve_dtype, seed_everything
from vlaa_min.schedule import cosine_with_warmup
from vlaa_min.train_state import resume_training, save_checkpoint, save_model

# Settings a resumed run may change: they do not shape training (the rest must equal the checkpoint's).
RESUME_SAFE = frozenset({"eval_every", "eval_batch_size", "save_every", "sample_every", "device", "compile",
                         "gradient_checkpointing", "skip_bad", "log_rollouts_every", "rollout_groups_per_log"})


@dataclass
class GRPOConfig:
    # data and model
    model: str = field(default="runs/base/model", metadata={"help": "policy init (HF-format checkpoint directory)"})
    data: str = field(default="toy/rl.json", metadata={"help": "RL records (VLAA-Thinking GRPO JSON or JSONL)"})
    images: str = field(default="toy/images", metadata={"help": "images root of the records"})
    eval_data: str | None = field(default="toy/test.json", metadata={"help": "held-out split (none = no eval)"})
    eval_size: int = field(default=500, metadata={"help": "held-out records evaluated (0 = all)"})
    out: str = field(default="runs/grpo", metadata={"help": "run directory"})
    # rollout
    steps: int = field(default=80, metadata={"help": "rollout steps (paper: 49 = one epoch of 25,195 prompts)"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per rollout (paper: 512)"})
    group_size: int = field(default=8, metadata={"help": "G, samples per prompt (paper: 4)"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature; log-probs use it too"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1 = off; off keeps ratios exact)"})
    max_new_tokens: int = field(default=96, metadata={"help": "completion budget (paper: 1024)"})
    max_prompt_length: int = field(default=1024, metadata={"help": "longer prompts are an error"})
    max_pixels: int = field(default=0, metadata={"help": "cap on an image's resized area (0 = the model's "
                                                         "preprocessor_config.json); 28*28*N: at most N image tokens"})
    # optimisation
    train_batch_size: int = field(default=32, metadata={"help": "samples per optimizer update (paper: 256, i.e. 8 "
                                                                  "updates per rollout of 512 x 4; here 256 / 32)"})
    micro_batch_size: int = field(default=32, metadata={"help": "samples per forward/backward"})
    mu: int = field(default=1, metadata={"help": "passes over each rollout buffer (PPO epochs)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (paper-scale models: 5e-6)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of updates with linear warmup (paper: 3%)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor / peak (paper: 5e-7 / 5e-6)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)"})
    clip_low: float = field(default=0.2, metadata={"help": "eps_low of the ratio clip"})
    clip_high: float = field(default=0.2, metadata={"help": "eps_high (DAPO's clip-higher: 0.28)"})
    loss_aggregation: str = field(default="seq-mean-token-mean", metadata={"help": "|".join(AGGREGATIONS)})
    scale_adv_by_std: bool = field(default=True, metadata={"help": "divide advantages by the group std "
                                                                    "(false: Dr. GRPO)"})
    drop_zero_std_groups: bool = field(default=False, metadata={"help": "train only on groups whose rewards differ"})
    kl_init: float = field(default=1e-3, metadata={"help": "beta at the start (0 = no KL, no reference model)"})
    kl_target: float = field(default=5e-4, metadata={"help": "adaptive controller target (0 = fixed beta)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive controller horizon (samples)"})
    kl_estimator: str = field(default="k3", metadata={"help": "|".join(KL_ESTIMATORS)})
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision tower fixed"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    # reward
    require_think: bool = field(default=False, metadata={"help": "also demand one <think> block (not the paper)"})
    open_scorer: str | None = field(default=None, metadata={"help": "import path module:attr of an open-ended "
                                                                     "scorer (default: toy scene / token F1)"})
    # runtime
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    precision: str = field(default="auto", metadata={"help": "autocast dtype: auto (bf16 on GPU), fp32, bf16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the engine's decode step"})
    seed: int = field(default=0, metadata={"help": "seed for data order and sampling"})
    eval_every: int = field(default=0, metadata={"help": "held-out eval every N steps (0 = before and after)"})
    eval_batch_size: int = field(default=50, metadata={"help": "prompts per eval generation batch"})
    save_every: int = field(default=25, metadata={"help": "checkpoint every N steps (0 = at the end only)"})
    sample_every: int = field(default=20, metadata={"help": "print decoded samples every N steps (0 = never)"})
    log_rollouts_every: int = field(default=5, metadata={"help": "write groups to rollouts.jsonl every N steps "
                                                                 "(0 = never; python -m vlaa_min.view)"})
    rollout_groups_per_log: int = field(default=4, metadata={"help": "groups per logged step (and 4x held-out "
                                                                     "answers per eval)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    overwrite: bool = field(default=False, metadata={"help": "delete what --out holds and start again"})
    skip_bad: bool = field(default=False, metadata={"help": "skip invalid records (reported) instead of failing"})

    def __post_init__(self):
        check_sizes(self, positive=("steps", "prompts_per_step", "group_size", "temperature", "max_new_tokens",
                                    "max_prompt_length", "train_batch_size", "micro_batch_size", "mu", "lr",
                                    "eval_batch_size"),
                    non_negative=("eval_size", "max_pixels", "warmup_ratio", "weight_decay", "grad_clip", "kl_init",
                                  "kl_target", "eval_every", "save_every", "sample_every", "log_rollouts_every",
                                  "rollout_groups_per_log"))
        rollout = self.prompts_per_step * self.group_size
        if self.train_batch_size % self.micro_batch_size:
            raise ConfigError(f"--train-batch-size {self.train_batch_size} must be a multiple of --micro-batch-size")
        if rollout % self.train_batch_size:
            raise ConfigError(f"a rollout of {self.prompts_per_step} x {self.group_size} = {rollout} samples must be a "
                             f"multiple of --train-batch-size {self.train_batch_size} (no sample is dropped)")
        if self.group_size < 2:
            raise ConfigError("GRPO needs --group-size >= 2 to form a baseline")
        if self.loss_aggregation not in AGGREGATIONS or self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"--loss-aggregation in {AGGREGATIONS}, --kl-estimator in {KL_ESTIMATORS}")


def chunks(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def group_major_order(rows: torch.Tensor, prompt_index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`rows` in a random order of their prompts, each prompt's samples together: a micro-batch then holds few
    distinct prompts, and score_completions runs each of them once for all of its samples."""
    prompt_order = torch.randperm(int(prompt_index.max()) + 1, generator=generator)
    return torch.cat([rows[prompt_index[rows] == prompt] for prompt in prompt_order])


def score_completions(model, processor, encoded, rows, rollout, cfg, device, precision, with_entropy=False):
    """Re-score rollout rows (indices into the buffer) under `model`: (n, L) log-probs, entropy, mask."""
    lengths = rollout.completion_lengths[rows]
    width = int(lengths.max())  # trim the micro-batch to its longest completion
    distinct, prompt_rows = torch.unique(rollout.prompt_index[rows], return_inverse=True)  # each prompt once
    prompts = processor.collate_prompts([encoded[int(p)] for p in distinct]).to(device)
    with autocast(device, precision):
        logp, entropy = completion_logprobs(model, prompts, rollout.completion_ids[rows, :width].to(device),
                                            lengths.to(device), cfg.temperature, with_entropy=with_entropy,
                                            prompt_rows=prompt_rows.to(device))
    mask = torch.arange(width, device=device)[None, :] < lengths.to(device)[:, None]
    return logp, entropy, mask


def evaluate_split(model, processor, engine, records, cfg, rewards_cfg, precision, rollout_log=None,
                   step: int = 0) -> dict:
    # [distributed] each rank answers a contiguous share of the records; the rows are gathered in record order
    rank, world = distributed.rank(), distributed.world_size()
    share = records[len(records) * rank // world : len(records) * (rank + 1) // world]
    with distributed.gathered(model):
        _, rows = evaluation.evaluate(model, processor, share, cfg.images, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.eval_batch_size, reward_config=rewards_cfg, engine=engine,
                                      precision=precision)
    rows = [row for rank_rows in distributed.all_gather_objects(rows) for row in rank_rows]
    if rollout_log is not None:
        rollout_log.log_answers(step, records, rows)
    return evaluation.summarize(records, rows), rows


def reward_config(cfg: GRPOConfig) -> "rewards.RewardConfig":
    return rewards.RewardConfig(require_think=cfg.require_think, open_scorer=cfg.open_scorer)


def check_world_size(cfg: GRPOConfig, world: int) -> None:
    """Under torchrun each rank takes P / N whole prompts and T / N samples of every optimizer batch."""
    if world == 1:
        return
    if world > cfg.prompts_per_step:
        raise ConfigError(f"{world} processes (NPROC) are more than the --prompts-per-step {cfg.prompts_per_step}: "
                          f"each process samples whole prompts")
    if cfg.prompts_per_step % world:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {world} processes "
                          f"(NPROC), each of which samples whole prompts")
    if cfg.train_batch_size % (world * cfg.group_size):
        raise ConfigError(f"--train-batch-size {cfg.train_batch_size} must split into whole groups of --group-size "
                          f"{cfg.group_size} on each of the {world} processes (NPROC)")
    if cfg.drop_zero_std_groups:
        raise ConfigError("--drop-zero-std-groups true runs in one process only (ranks would drop different counts)")


def main(cfg: GRPOConfig) -> dict:
    device = distributed.setup(cfg.device)  # [distributed] joins torchrun's job if there is one
    rank, world = distributed.rank(), distributed.world_size()  # one process: 0, 1
    check_world_size(cfg, world)
    print_config(cfg)
    check_out_folder(cfg.out, cfg.resume, cfg.overwrite)
    check_model_dir(cfg.model)
    seed_everything(cfg.seed)
    precision = resolve_dtype(cfg.precision, device)

    # --- data: validated (fields, types, gt for its reward, images, prompt lengths) before anything runs
    rewards_cfg = reward_config(cfg)
    processor = Processor.from_pretrained(cfg.model, cfg.max_pixels)
    records = data.load_records(cfg.data, cfg.images, skip_bad=cfg.skip_bad, reward_config=rewards_cfg)
    records = data.check_prompt_lengths(records, cfg.data, processor, cfg.images, cfg.max_prompt_length,
                                        "--max-prompt-length", leave_room=False, skip_bad=cfg.skip_bad)
    eval_records = data.load_records(cfg.eval_data, cfg.images, skip_bad=cfg.skip_bad,
                                     reward_config=rewards_cfg) if cfg.eval_data else []
    if cfg.eval_size > len(eval_records) > 0:
        raise ConfigError(f"--eval-size {cfg.eval_size} is more than the {len(eval_records)} records of "
                          f"{cfg.eval_data}")
    eval_records = eval_records[: cfg.eval_size] if cfg.eval_size else eval_records
    updates_per_step = cfg.mu * cfg.prompts_per_step * cfg.group_size // cfg.train_batch_size
    total_updates = cfg.steps * updates_per_step
    print(f"{len(records)} RL prompts, {len(eval_records)} held out; {cfg.steps} steps x {cfg.prompts_per_step} "
          f"prompts x G={cfg.group_size}; {updates_per_step} update(s) per step")

    # --- models: the policy (fp32 master weights) and, when beta can be > 0, a frozen reference
    policy = VLModel.from_pretrained(cfg.model, dtype=torch.float32, device=device)
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.freeze_vision:
        policy.visual.requires_grad_(False)
    reference = None
    if cfg.kl_init > 0:
        reference = copy.deepcopy(policy).to(precision if device.type == "cuda" else torch.float32).eval()
        reference.requires_grad_(False)
    distributed.shard(policy, device)  # [distributed] FSDP2, the reference sharded the same way; one process: no-op
    if reference is not None:
        distributed.shard(reference, device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = cosine_with_warmup(optimizer, total_updates, cfg.warmup_ratio, cfg.min_lr_ratio)
    kl_controller = (AdaptiveKLController(cfg.kl_init, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
                     else FixedKLController(cfg.kl_init))
    sampler = data.EpochSampler(len(records), seed=cfg.seed, rank=rank, world_size=world)
    engine = Engine(policy, pad_token_id=processor.special_ids["pad_token_id"], compile=cfg.compile)
    sampling = SamplingParams.for_processor(processor, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # rollout sampling
    shuffler = torch.Generator().manual_seed(cfg.seed + 1)  # order of samples within a rollout buffer

    # --- the run folder: created only now that the inputs check out
    settings = dataclasses.asdict(cfg) | {"data_sha256": file_sha256(cfg.data),
                                          "eval_data_sha256": file_sha256(cfg.eval_data)}
    lock, resumed = open_run(cfg.out, settings, resume=cfg.resume, overwrite=cfg.overwrite, safe=RESUME_SAFE)
    start_step, history = 0, {}
    if resumed:
        state = resume_training(*resumed, policy, optimizer, scheduler, sampler)
        kl_controller.load_state_dict(state["kl_controller"])
        generator.set_state(state["generator"])
        shuffler.set_state(state["shuffler"])
        start_step, history = state["step"], state["history"]
    metrics = MetricsLogger(os.path.join(cfg.out, "metrics.jsonl"), resume_step=start_step if resumed else None)
    rollout_log = RolloutLog(os.path.join(cfg.out, "rollouts.jsonl"), cfg.log_rollouts_every,
                             cfg.rollout_groups_per_log, resume_step=start_step if resumed else None)

    def save(step: int) -> None:
        save_checkpoint(cfg.out, step, policy, processor, {
            "optimizer": distributed.optimizer_state(policy, optimizer), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "kl_controller": kl_controller.state_dict(),
            "shuffler": shuffler.get_state(), "history": history, "settings": settings},
            per_rank={"generator": generator.get_state()})

    before_rows = None
    if eval_records and "before" not in history:
        history["before"], before_rows = evaluate_split(policy, processor, engine, eval_records, cfg, rewards_cfg,
                                                        precision, rollout_log, step=0)
        print("held-out before GRPO:\n" + evaluation.markdown_table({"before": history["before"]}))
        # The viewer's probes: held-out questions answered wrong before training, sampled again at each logged step.
        history["probe_ids"] = [row["id"] for row in before_rows if not row["correct"]][: cfg.rollout_groups_per_log]
    by_id = {record.get("id"): record for record in eval_records}
    probes = [by_id[i] for i in history.get("probe_ids", [])] or records[: cfg.rollout_groups_per_log]

    progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="grpo",
                    dynamic_ncols=True, disable=not distributed.is_main())
    for step in progress:
        # --- rollout: P prompts, each prefilled once, G samples each
        t0 = time.perf_counter()
        batch_records = [records[i] for i in sampler.next_batch(cfg.prompts_per_step)]
        encoded = [data.encode_prompt(r, processor, cfg.images, cfg.max_prompt_length) for r in batch_records]
        prompts = processor.collate_prompts(encoded).to(device)
        policy.eval()
        with distributed.gathered(policy), autocast(device, precision):  # [distributed] one all-gather per rollout
            rollout = engine.generate(prompts, cfg.group_size, sampling, generator)
        policy.train()
        rollout = rollout.to("cpu")  # rewards, advantages and bookkeeping run on the host
        t1 = time.perf_counter()

        # --- reward: one per completion, by the sample's type
        lengths = rollout.completion_lengths  # (N,) stop token included
        texts = [processor.decode(rollout.completion_ids[i, : int(n)].tolist()) for i, n in enumerate(lengths)]
        samples = [batch_records[int(p)] for p in rollout.prompt_index]
        scored = rewards.compute_rewards(texts, samples, config=rewards_cfg)
        for result, text in zip(scored, texts):
            result["reasons"] = evaluation.reasons(text)  # for the log: does this completion reason first?
        reward = torch.tensor([s["reward"] for s in scored]).view(len(batch_records), cfg.group_size)  # (P, G)
        check_finite(step + 1, cfg.out, reward=reward.sum().item())
        t2 = time.perf_counter()

        # --- advantage: normalised within each group of G
        advantages = group_advantages(reward, cfg.scale_adv_by_std).flatten()  # (N,)
        zero_std = equal_reward_groups(reward)  # (P,) groups that carry no signal
        rows = torch.arange(len(texts))
        if cfg.drop_zero_std_groups:
            rows = rows[~zero_std[rollout.prompt_index]]

        # --- reference log-probs, once per rollout
        ref_logp = None
        if reference is not None and len(rows):
            ref_logp = torch.zeros(rollout.logprobs.shape, device=device)  # (N, L), 0 past each length
            with torch.no_grad():
                for micro in chunks(rows, cfg.micro_batch_size):
                    logp, _, mask = score_completions(reference, processor, encoded, micro, rollout, cfg, device,
                                                      precision)
                    ref_logp[micro.to(device), : mask.shape[1]] = logp.float()

        # --- policy update: mu passes over the buffer, in optimizer batches of micro-batches
        sums = defaultdict(float)
        for _ in range(cfg.mu):
            order = group_major_order(rows, rollout.prompt_index, shuffler)
            for update_rows in chunks(order, cfg.train_batch_size // world):  # this rank's share of the batch
                normaliser = distributed.all_reduce_sum(  # [distributed] the whole batch's, over every rank
                    loss_normaliser(cfg.loss_aggregation, lengths[update_rows], cfg.max_new_tokens))
                for micro in chunks(update_rows, cfg.micro_batch_size):
                    logp, entropy, mask = score_completions(policy, processor, encoded, micro, rollout, cfg, device,
                                                            precision, with_entropy=True)
                    width = mask.shape[1]
                    old = rollout.logprobs[micro, :width].to(device)
                    ref = ref_logp[micro.to(device), :width] if ref_logp is not None else None
                    loss, token_sums = policy_loss(
                        logp, old, advantages[micro].to(device), mask, clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation, normaliser=normaliser,
                        beta=kl_controller.value, ref_logp=ref, kl_estimator=cfg.kl_estimator)
                    loss.backward()
                    sums["loss"] += loss.item()
                    sums["tokens"] += int(mask.sum())
                    sums["entropy"] += float((entropy * mask).sum())
                    if sums["updates"] == 0:  # on-policy: trainer and engine must agree (precision drift)
                        sums["logp_drift"] += float(((logp.detach() - old).abs() * mask).sum())
                        sums["drift_tokens"] += int(mask.sum())
                    for name, value in token_sums.items():
                        sums[name] += float(value)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))
                grad_norm = distributed.full_norm(grad_norm)
                check_finite(step + 1, cfg.out, loss=sums["loss"], grad_norm=float(grad_norm))
                sums["grad_norm"] += float(grad_norm)
                sums["updates"] += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        # --- [distributed] the KL controller sees the whole step: the sums of every rank
        if world > 1:
            sums.update({k: distributed.all_reduce_sum(v) for k, v in sums.items()
                         if k not in ("grad_norm", "updates")})  # those two are already the same on every rank
        mean_kl = sums["kl"] / max(sums["tokens"], 1)
        kl_controller.update(mean_kl, n_samples=distributed.all_reduce_sum(len(rows)))
        t3 = time.perf_counter()

        # --- rollout log (python -m vlaa_min.view): a few groups re-scored after the update, a few fixed prompts
        if rollout_log.due(step + 1):
            def updated_logp(subset):
                return score_completions(policy, processor, encoded, subset, rollout, cfg, device, precision)[0]
            rollout_log.log_rollout(step + 1, batch_records, rollout, texts, scored, advantages, ref_logp,
                                    processor.tokenizer, updated_logp, kl_estimator=cfg.kl_estimator)
            with distributed.gathered(policy):  # [distributed] one all-gather for the probes' generation
                _, probe_rows = evaluation.evaluate(
                    policy, processor, probes, cfg.images, samples=cfg.group_size, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, reward_config=rewards_cfg,
                    seed=cfg.seed, engine=engine, precision=precision, progress=False)
            rollout_log.log_answers(step + 1, probes, probe_rows, kind="probe", samples=cfg.group_size)

        # --- [distributed] the log sees the whole step's rollout, gathered from every rank (after the rollout log,
        # which reads this rank's own rows; rank 0's is the one written)
        if world > 1:
            reward, lengths, zero_std = (torch.cat(distributed.all_gather_objects(t))
                                         for t in (reward, lengths, zero_std))
            scored = sum(distributed.all_gather_objects(scored), [])
            rollout.finish_reasons = sum(distributed.all_gather_objects(rollout.finish_reasons), [])

        # --- log
        generated = int(lengths.sum())
        row = {
            "step": step + 1,
            "reward": reward.mean().item(),
            "reward_std": reward.std().item(),
            "accuracy": sum(s["correct"] for s in scored) / len(scored),
            "format_failure": sum(s["reason"] == "format" for s in scored) / len(scored),
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "completion_length": lengths.float().mean().item(),
            "reasoning_share": sum(s["reasons"] for s in scored) / len(scored),
            "completion_length_max": int(lengths.max()),
            "truncated": sum(r == "length" for r in rollout.finish_reasons) / len(scored),
            "loss": sums["loss"] / max(sums["updates"], 1),
            "kl": mean_kl,
            "beta": kl_controller.value,
            "entropy": sums["entropy"] / max(sums["tokens"], 1),
            "clip_low": sums["clip_low"] / max(sums["tokens"], 1),
            "clip_high": sums["clip_high"] / max(sums["tokens"], 1),
            "logp_drift": sums["logp_drift"] / max(sums["drift_tokens"], 1),
            "grad_norm": sums["grad_norm"] / max(sums["updates"], 1),
            "lr": scheduler.get_last_lr()[0],
            "time_generate": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2,
            "gen_tokens_per_s": generated / (t1 - t0),
        }
        for rtype in sorted({s["type"] for s in scored}):
            of_type = [i for i, s in enumerate(scored) if s["type"] == rtype]
            row[f"reward/{rtype}"] = sum(scored[i]["reward"] for i in of_type) / len(of_type)
            row[f"accuracy/{rtype}"] = sum(scored[i]["correct"] for i in of_type) / len(of_type)
            row[f"reasoning_share/{rtype}"] = sum(scored[i]["reasons"] for i in of_type) / len(of_type)
            row[f"completion_length/{rtype}"] = sum(float(lengths[i]) for i in of_type) / len(of_type)
        progress.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                             len=f"{row['completion_length']:.0f}", kl=f"{mean_kl:.4f}")
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            shown = {}
            for text, sample, result in zip(texts, samples, scored):
                shown.setdefault(result["type"], (sample, text, result))
            for rtype, (sample, text, result) in sorted(shown.items()):
                tqdm.write(f"  [{rtype}] {sample['question'].splitlines()[0]} | gt {sample['gt']} | "
                           f"reward {result['reward']:.2f}\n    {text[:300]!r}")

        # --- eval / save
        if eval_records and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            summary, _ = evaluate_split(policy, processor, engine, eval_records, cfg, rewards_cfg, precision,
                                     rollout_log, step=step + 1)
            row["eval_accuracy"] = summary["accuracy"]
            row.update({f"eval_accuracy/{t}": v["accuracy"] for t, v in summary["per_type"].items()})
        metrics.log(row)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)

    # --- the end: final eval, checkpoint, model directory, plot
    if eval_records:
        history["after"], after_rows = evaluate_split(policy, processor, engine, eval_records, cfg, rewards_cfg,
                                                      precision, rollout_log, step=cfg.steps)
        table = evaluation.markdown_table({"before GRPO": history["before"], "after GRPO": history["after"]})
        if distributed.is_main():  # [distributed] rank 0 writes the files
            with open(os.path.join(cfg.out, "eval.md"), "w") as f:
                f.write(table + "\n")
            with open(os.path.join(cfg.out, "eval.json"), "w") as f:  # the summaries, for control.py, experiment.py
                json.dump(history, f, indent=1)
        print("held-out accuracy (%), greedy:\n" + table)
        if before_rows is not None:
            print(evaluation.before_and_after(eval_records, before_rows, after_rows))
    save(cfg.steps)
    final_dir = os.path.join(cfg.out, "model")
    save_model(final_dir, policy, processor)
    png = distributed.is_main() and plot_curves(  # [distributed] rank 0 plots
        {os.path.basename(os.path.normpath(cfg.out)): os.path.join(cfg.out, "metrics.jsonl")},
        ["reward", "accuracy", "reasoning_share", "completion_length", "reasoning_share/*", "completion_length/*"],
        os.path.join(cfg.out, "curves.png"), title="GRPO")
    release_lock(lock)
    print(f"metrics: {cfg.out}/metrics.jsonl  plot: {png or 'none'}  model: {final_dir}")
    if cfg.log_rollouts_every:
        print(f"see what GRPO saw: make view RUN={cfg.out}  (= python -m vlaa_min.view {cfg.out}), then open "
              f"{cfg.out}/rollouts.html")
    return history


if __name__ == "__main__":
    run_script(main, GRPOConfig, __doc__)
