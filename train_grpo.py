"""GRPO for vision-language models with the paper's mixed reward: one readable loop.

Each step: rollout -> reward -> advantage -> reference -> update, then log, eval and save. For every prompt, G
completions are sampled at temperature tau from the policy at rollout time (pi_old) and each gets a reward in [0, 1]
from rewards/ (a missing or repeated <answer> block scores 0: the implicit format reward). The objective, term by
term with the flag of each, is in vlaa_min/grpo_loss.py's docstring; `main` below runs the loop around it.

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
--lora-rank R: LoRA on the decoder (vlaa_min/lora.py), the reference is the policy with its adapters off, and
checkpoints hold the adapter.
Resume with the same command plus --resume true. Under torchrun each rank samples its share of the prompts (a
prompt's G samples stay on their rank); normaliser, KL controller and metrics are global (the [distributed] lines).
"""

import copy
import dataclasses
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import evaluate
import rewards
from vlaa_min import lora
from vlaa_min.generate import Engine, Rollout, SamplingParams, concat_rollouts
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
from vlaa_min.infra import distributed
from vlaa_min.infra.cli import ConfigError, UserError, check_sizes, print_config, run_script
from vlaa_min.infra.run_folder import (check_finite, check_model_dir, check_out_folder, file_sha256, on_rank_0,
                                       open_run, release_lock)
from vlaa_min.infra.runtime import autocast, resolve_dtype, seed_everything
from vlaa_min.infra.train_state import resume_training, save_checkpoint, save_model
from vlaa_min.logprobs import completion_logprobs
from vlaa_min.metrics import MetricsLogger, plot_curves
from vlaa_min.model import VLModel
from vlaa_min.presets import TOY_OPEN_SCORER
from vlaa_min.processor import Processor
from vlaa_min.rollout_log import RolloutLog
from vlaa_min.schedule import cosine_with_warmup

# Settings a resumed run may change: they do not shape training (the rest must equal the checkpoint's). Among them
# the memory knobs, so that a run that ran out of memory resumes; rollout_batch_size changes only which samples
# are drawn.
RESUME_SAFE = frozenset({"eval_every", "eval_batch_size", "save_every", "sample_every", "device", "compile",
                         "gradient_checkpointing", "rollout_batch_size", "skip_bad", "log_rollouts_every",
                         "rollout_groups_per_log"})


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
    rollout_batch_size: int = field(default=0, metadata={"help": "prompts per engine call in a rollout, per rank "
                                                                 "(0 = all at once); lowers only the rollout's memory"})
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
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank r on the decoder (0 = full fine-tuning); the "
                                                        "KL reference is then the policy with its adapters off"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale alpha: the update is (alpha / r) B A"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_targets: str = field(default=lora.DEFAULT_TARGETS, metadata={"help": "decoder linears LoRA adapts"})
    lora_rollout: str = field(default="merged", metadata={"help": "rollouts with the adapters merged into the "
                                                                  "weights or through the adapters: merged|adapters"})
    # reward
    require_think: bool = field(default=False, metadata={"help": "also demand one <think> block (not the paper)"})
    open_scorer: str | None = field(default=TOY_OPEN_SCORER, metadata={
        "help": "open-ended scorer, module:attr (none = token F1 with gt)"})
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
                    non_negative=("eval_size", "rollout_batch_size", "max_pixels", "warmup_ratio", "min_lr_ratio",
                                  "weight_decay", "grad_clip", "kl_init", "kl_target", "eval_every", "save_every",
                                  "sample_every", "log_rollouts_every", "rollout_groups_per_log"))
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
        lora.check_flags(self)
        if self.lora_rollout not in lora.ROLLOUT_MODES:
            raise ConfigError(f"--lora-rollout must be one of {'|'.join(lora.ROLLOUT_MODES)}, "
                              f"got {self.lora_rollout}")


@dataclass
class StepBatch:
    """One step's data, from the rollout to the log: P prompts x G completions, completion n = p * G + g."""

    records: list[dict]  # (P,) the prompts' records
    prompts: list[dict]  # (P,) their encoded prompts (data.encode_prompt): every re-scoring pass starts from them
    rollout: Rollout  # (N, L) completion ids and log pi_old, (N,) lengths and prompt_index; on the host
    texts: list[str] = field(default_factory=list)  # (N,) the decoded completions
    scores: list[dict] = field(default_factory=list)  # (N,) rewards.compute_rewards' results, plus "reasons"
    rewards: torch.Tensor | None = None  # (P, G)
    advantages: torch.Tensor | None = None  # (N,)
    no_signal: torch.Tensor | None = None  # (P,) bool: the groups whose G rewards are all equal
    ref_logp: torch.Tensor | None = None  # (N, L) log pi_ref on the device, 0 past each length; None: no KL

    @property
    def lengths(self) -> torch.Tensor:
        return self.rollout.completion_lengths  # (N,) the stop token included

    def samples(self) -> list[dict]:
        """(N,) each completion's record."""
        return [self.records[int(p)] for p in self.rollout.prompt_index]


@dataclass
class Run:
    """What every step uses as it is: the settings, the device, the processor, the policy, its engine, the reward."""

    cfg: GRPOConfig
    device: torch.device
    precision: torch.dtype
    processor: Processor
    policy: VLModel
    engine: Engine
    rewards_cfg: rewards.RewardConfig


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def group_major_order(ids: torch.Tensor, prompt_index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Completions `ids` in a random order of their prompts, each prompt's completions together: a micro-batch then
    holds few distinct prompts, and logprobs_of runs each of them once for all of its completions."""
    prompt_order = torch.randperm(int(prompt_index.max()) + 1, generator=generator)
    return torch.cat([ids[prompt_index[ids] == prompt] for prompt in prompt_order])


def logprobs_of(model, run: Run, batch: StepBatch, ids: torch.Tensor, with_entropy: bool = False):
    """Completions `ids` (indices into the batch) re-scored under `model`: (n, width) log-probs, entropy, mask."""
    lengths = batch.lengths[ids].to(run.device)
    width = int(lengths.max())  # trim the micro-batch to its longest completion
    distinct, prompt_rows = torch.unique(batch.rollout.prompt_index[ids], return_inverse=True)  # each prompt once
    prompts = run.processor.collate_prompts([batch.prompts[int(p)] for p in distinct]).to(run.device)
    completions = batch.rollout.completion_ids[ids, :width].to(run.device)
    with autocast(run.device, run.precision):
        logp, entropy = completion_logprobs(model, prompts, completions, lengths, run.cfg.temperature,
                                            with_entropy=with_entropy, prompt_rows=prompt_rows.to(run.device))
    mask = torch.arange(width, device=run.device)[None, :] < lengths[:, None]
    return logp, entropy, mask


def main(cfg: GRPOConfig) -> dict:
    device = distributed.setup(cfg.device)  # [distributed] joins torchrun's job if there is one
    world = distributed.world_size()  # one process: 1
    check_world_size(cfg, world)
    print_config(cfg)
    on_rank_0(check_out_folder, cfg.out, cfg.resume, cfg.overwrite)  # under torchrun: every rank stops
    check_model_dir(cfg.model)
    if cfg.lora_rank:
        lora.check_targets(cfg.model, cfg.lora_targets)  # before any weight is read
    seed_everything(cfg.seed)
    precision = resolve_dtype(cfg.precision, device)
    processor = Processor.from_pretrained(cfg.model, cfg.max_pixels)
    rewards_cfg = reward_config(cfg)
    records, eval_records = load_data(cfg, processor, rewards_cfg)  # every record checked before anything runs

    # --- models: the policy (fp32 master weights) and, when beta can be > 0, a frozen reference
    policy, reference = load_models(cfg, device, precision)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    updates_per_step = cfg.mu * cfg.prompts_per_step * cfg.group_size // cfg.train_batch_size
    scheduler = cosine_with_warmup(optimizer, cfg.steps * updates_per_step, cfg.warmup_ratio, cfg.min_lr_ratio)
    kl_controller = (AdaptiveKLController(cfg.kl_init, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
                     else FixedKLController(cfg.kl_init))
    sampler = data.EpochSampler(len(records), seed=cfg.seed, rank=distributed.rank(), world_size=world)
    engine = Engine(policy, pad_token_id=processor.special_ids["pad_token_id"], compile=cfg.compile)
    sampling = SamplingParams.for_processor(processor, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # rollout sampling
    shuffler = torch.Generator().manual_seed(cfg.seed + 1)  # order of samples within a rollout buffer
    run = Run(cfg, device, precision, processor, policy, engine, rewards_cfg)
    print(f"{len(records)} RL prompts, {len(eval_records)} held out; {cfg.steps} steps x {cfg.prompts_per_step} "
          f"prompts x G={cfg.group_size}; {updates_per_step} update(s) per step")

    # --- the run folder: created only now that the inputs check out; on --resume, the newest checkpoint
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

    before_rows, probes = evaluate_before(run, eval_records, records, history, rollout_log)
    if start_step == 0 and rollout_log.due(0):
        sample_probes(run, rollout_log, probes, step=0)  # the viewer's step 0: the probes before any update
    progress = tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps, desc="grpo",
                    dynamic_ncols=True, disable=not distributed.is_main())
    for step in progress:  # 1-based: the step that is running
        # --- rollout: P prompts, each prefilled once, G samples each
        t0 = time.perf_counter()
        step_records = [records[i] for i in sampler.next_batch(cfg.prompts_per_step)]
        encoded = [data.encode_prompt(r, processor, cfg.images, cfg.max_prompt_length) for r in step_records]
        policy.eval()
        with (distributed.gathered(policy),  # [distributed] one all-gather per rollout
              lora.rollout_weights(policy, cfg.lora_rollout),  # LoRA: the adapters merged or not
              autocast(device, precision)):
            # one engine call per --rollout-batch-size prompts: only one call's keys/values are alive at a time
            parts = [engine.generate(processor.collate_prompts(part).to(device), cfg.group_size, sampling,
                                     generator).to("cpu")
                     for part in chunks(encoded, cfg.rollout_batch_size or len(encoded))]
        policy.train()
        batch = StepBatch(step_records, encoded, concat_rollouts(parts, processor.pad_token_id))  # on the host
        check_finite(step, cfg.out, sample_logprobs=batch.rollout.logprobs.sum().item())  # NaN: diverged weights
        t1 = time.perf_counter()

        # --- reward: one per completion, by the sample's type
        batch.texts = [processor.decode(ids[: int(n)].tolist())
                       for ids, n in zip(batch.rollout.completion_ids, batch.lengths)]
        try:
            batch.scores = rewards.compute_rewards(batch.texts, batch.samples(), config=rewards_cfg)
        except rewards.ScorerError as error:  # the --open-scorer failed: stop with its line, as a NaN stops
            raise UserError(f"step {step}: {error}; training stopped before the update") from None
        for score, text in zip(batch.scores, batch.texts):
            score["reasons"] = evaluate.reasons(text)  # for the log: does this completion reason first?
        batch.rewards = torch.tensor([s["reward"] for s in batch.scores]).view(len(step_records), cfg.group_size)
        check_finite(step, cfg.out, reward=batch.rewards.sum().item())
        t2 = time.perf_counter()

        # --- advantage: normalised within each group of G
        batch.advantages = group_advantages(batch.rewards, cfg.scale_adv_by_std).flatten()  # (N,)
        batch.no_signal = equal_reward_groups(batch.rewards)  # (P,)
        trained = torch.arange(len(batch.texts))  # the completions the update trains on
        if cfg.drop_zero_std_groups:
            trained = trained[~batch.no_signal[batch.rollout.prompt_index]]

        # --- reference log-probs, once per rollout
        if reference is not None and len(trained):
            batch.ref_logp = torch.zeros(batch.rollout.logprobs.shape, device=device)  # (N, L)
            with torch.no_grad(), lora.adapters_off(reference):  # with LoRA the reference is the base: no adapters
                for micro in chunks(trained, cfg.micro_batch_size):
                    logp, _, mask = logprobs_of(reference, run, batch, micro)
                    batch.ref_logp[micro.to(device), : mask.shape[1]] = logp.float()

        # --- policy update: mu passes over the buffer, in optimizer batches of micro-batches
        totals, updates = defaultdict(float), 0
        for _ in range(cfg.mu):
            order = group_major_order(trained, batch.rollout.prompt_index, shuffler)
            for update_ids in chunks(order, cfg.train_batch_size // world):  # this rank's share of the batch
                normaliser = distributed.all_reduce_sum(  # [distributed] the whole batch's, over every rank
                    loss_normaliser(cfg.loss_aggregation, batch.lengths[update_ids], cfg.max_new_tokens))
                for micro in chunks(update_ids, cfg.micro_batch_size):
                    logp, entropy, mask = logprobs_of(policy, run, batch, micro, with_entropy=True)
                    old = batch.rollout.logprobs[micro, : mask.shape[1]].to(device)
                    ref = batch.ref_logp[micro.to(device), : mask.shape[1]] if batch.ref_logp is not None else None
                    loss, token_sums = policy_loss(
                        logp, old, batch.advantages[micro].to(device), mask, clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation, normaliser=normaliser,
                        beta=kl_controller.value, ref_logp=ref, kl_estimator=cfg.kl_estimator)
                    loss.backward()
                    totals["loss"] += loss.item()
                    totals["tokens"] += int(mask.sum())
                    totals["entropy"] += float((entropy * mask).sum())
                    if updates == 0:  # on-policy: trainer and engine must agree (precision drift)
                        totals["logp_drift"] += float(((logp.detach() - old).abs() * mask).sum())
                        totals["drift_tokens"] += int(mask.sum())
                    for name, value in token_sums.items():
                        totals[name] += float(value)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))
                grad_norm = distributed.full_norm(grad_norm)
                check_finite(step, cfg.out, loss=totals["loss"], grad_norm=float(grad_norm))
                totals["grad_norm"] += float(grad_norm)
                updates += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()

        # --- KL controller: [distributed] it sees the whole step, the sums of every rank
        if world > 1:
            totals.update({k: distributed.all_reduce_sum(v) for k, v in totals.items()
                           if k != "grad_norm"})  # the grad norm is already the same on every rank
        mean_kl = totals["kl"] / max(totals["tokens"], 1)
        kl_controller.update(mean_kl, n_samples=distributed.all_reduce_sum(len(trained)))
        t3 = time.perf_counter()

        # --- log, eval, save
        if rollout_log.due(step):
            log_rollout(run, rollout_log, batch, step, probes)
        row = step_metrics(step, batch, totals, updates, mean_kl, kl_controller.value, scheduler.get_last_lr()[0],
                           seconds={"generate": t1 - t0, "reward": t2 - t1, "train": t3 - t2})
        progress.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                             len=f"{row['completion_length']:.0f}", kl=f"{mean_kl:.4f}")
        if cfg.sample_every and step % cfg.sample_every == 0:
            print_samples(batch)
        if eval_records and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            summary, _ = evaluate_split(policy, processor, eval_records, cfg, precision, engine, rollout_log, step)
            row |= {"eval_accuracy": summary["accuracy"]}
            row |= {f"eval_accuracy/{t}": v["accuracy"] for t, v in summary["per_type"].items()}
        metrics.log(row)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save(step)

    # --- the end: final eval, checkpoint, model directory, plot
    if eval_records:
        evaluate_after(run, eval_records, history, before_rows, rollout_log)
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


# --- what main calls around the loop: setup, the log, the held-out evals ------------------------------------------


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


def load_data(cfg: GRPOConfig, processor: Processor, rewards_cfg) -> tuple[list[dict], list[dict]]:
    """The RL records and the held-out ones, validated (fields, types, a gt for its reward, images, prompt
    lengths): a bad record stops the run here, before anything is written."""
    records = data.load_records(cfg.data, cfg.images, skip_bad=cfg.skip_bad, reward_config=rewards_cfg)
    records = data.check_prompt_lengths(records, cfg.data, processor, cfg.images, cfg.max_prompt_length,
                                        "--max-prompt-length", leave_room=False, skip_bad=cfg.skip_bad)
    eval_records = data.load_records(cfg.eval_data, cfg.images, skip_bad=cfg.skip_bad,
                                     reward_config=rewards_cfg) if cfg.eval_data else []
    if cfg.eval_size > len(eval_records) > 0:
        raise ConfigError(f"--eval-size {cfg.eval_size} is more than the {len(eval_records)} records of "
                          f"{cfg.eval_data}")
    return records, eval_records[: cfg.eval_size] if cfg.eval_size else eval_records


def load_models(cfg: GRPOConfig, device: torch.device, precision: torch.dtype) -> tuple[VLModel, VLModel | None]:
    """The policy in fp32 (the vision tower frozen unless told) and its frozen copy, the reference (None when
    beta stays 0), both sharded under torchrun. With LoRA: a frozen base (bf16 on a GPU) with fp32 adapters, and
    the reference is the policy itself, run with its adapters off."""
    policy = VLModel.from_pretrained(cfg.model, dtype=lora.base_dtype(cfg.lora_rank, device), device=device)
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.freeze_vision:
        policy.visual.requires_grad_(False)
    reference = None
    if cfg.lora_rank:
        lora.apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, base=cfg.model)
        distributed.shard(policy, device)
        print(lora.describe(policy) + "\n" + lora.rollout_note(policy, cfg.lora_rollout))
        return policy, policy if cfg.kl_init > 0 else None
    if cfg.kl_init > 0:
        reference = copy.deepcopy(policy).to(precision if device.type == "cuda" else torch.float32).eval()
        reference.requires_grad_(False)
    distributed.shard(policy, device)  # [distributed] FSDP2, the reference sharded the same way; one process: no-op
    if reference is not None:
        distributed.shard(reference, device)
    return policy, reference


def step_metrics(step: int, batch: StepBatch, totals: dict, updates: int, kl: float, beta: float, lr: float,
                 seconds: dict[str, float]) -> dict:
    """The step's metrics.jsonl row. [distributed] Over the whole step: every rank's rollout is gathered."""
    rewards_, lengths, no_signal = batch.rewards, batch.lengths, batch.no_signal
    scores, finish_reasons = batch.scores, batch.rollout.finish_reasons
    if distributed.world_size() > 1:
        rewards_, lengths, no_signal = (torch.cat(distributed.all_gather_objects(t))
                                        for t in (rewards_, lengths, no_signal))
        scores = sum(distributed.all_gather_objects(scores), [])
        finish_reasons = sum(distributed.all_gather_objects(finish_reasons), [])
    n, tokens = len(scores), max(totals["tokens"], 1)
    row = {
        "step": step,
        "reward": rewards_.mean().item(),
        "reward_std": rewards_.std().item(),
        "accuracy": sum(s["correct"] for s in scores) / n,
        "format_failure": sum(s["reason"] == "format" for s in scores) / n,
        "frac_reward_zero_std": no_signal.float().mean().item(),
        "completion_length": lengths.float().mean().item(),
        "reasoning_share": sum(s["reasons"] for s in scores) / n,
        "completion_length_max": int(lengths.max()),
        "truncated": sum(r == "length" for r in finish_reasons) / n,
        "loss": totals["loss"] / max(updates, 1),
        "kl": kl,
        "beta": beta,
        "entropy": totals["entropy"] / tokens,
        "clip_low": totals["clip_low"] / tokens,
        "clip_high": totals["clip_high"] / tokens,
        "logp_drift": totals["logp_drift"] / max(totals["drift_tokens"], 1),
        "grad_norm": totals["grad_norm"] / max(updates, 1),
        "lr": lr,
        **{f"time_{name}": value for name, value in seconds.items()},
        "gen_tokens_per_s": int(lengths.sum()) / seconds["generate"],
    }
    for rtype in sorted({s["type"] for s in scores}):
        of_type = [i for i, s in enumerate(scores) if s["type"] == rtype]
        row[f"reward/{rtype}"] = sum(scores[i]["reward"] for i in of_type) / len(of_type)
        row[f"accuracy/{rtype}"] = sum(scores[i]["correct"] for i in of_type) / len(of_type)
        row[f"reasoning_share/{rtype}"] = sum(scores[i]["reasons"] for i in of_type) / len(of_type)
        row[f"completion_length/{rtype}"] = sum(float(lengths[i]) for i in of_type) / len(of_type)
    return row


def print_samples(batch: StepBatch) -> None:
    """One completion of each reward type, under the progress bar."""
    shown = {}
    for text, sample, score in zip(batch.texts, batch.samples(), batch.scores):
        shown.setdefault(score["type"], (sample, text, score))
    for rtype, (sample, text, score) in sorted(shown.items()):
        tqdm.write(f"  [{rtype}] {sample['question'].splitlines()[0]} | gt {sample['gt']} | "
                   f"reward {score['reward']:.2f}\n    {text[:300]!r}")


def log_rollout(run: Run, rollout_log: RolloutLog, batch: StepBatch, step: int, probes: list[dict]) -> None:
    """The viewer's entries of a logged step: its first groups re-scored after the update, and G fresh samples
    of each probe (python -m vlaa_min.view)."""
    def updated_logprobs(ids: torch.Tensor) -> torch.Tensor:
        return logprobs_of(run.policy, run, batch, ids)[0]

    rollout_log.log_rollout(step, batch, run.processor.tokenizer, updated_logprobs, kl_estimator=run.cfg.kl_estimator)
    sample_probes(run, rollout_log, probes, step)


def sample_probes(run: Run, rollout_log: RolloutLog, probes: list[dict], step: int) -> None:
    """G fresh samples of each probe, with the same seed at every logged step (not trained on)."""
    cfg = run.cfg
    with distributed.gathered(run.policy):  # [distributed] one all-gather for the probes' generation
        _, probe_rows = evaluate.evaluate(
            run.policy, run.processor, probes, cfg.images, samples=cfg.group_size, temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, reward_config=run.rewards_cfg,
            seed=cfg.seed, engine=run.engine, precision=run.precision, progress=False)
    rollout_log.log_answers(step, probes, probe_rows, kind="probe", samples=cfg.group_size)


def evaluate_split(model, processor, records, cfg: GRPOConfig, precision, engine=None, rollout_log=None,
                   step: int = 0) -> tuple[dict, list[dict]]:
    """Greedy answers to the held-out records under the GRPO run's length budget and reward: (summary, rows)."""
    # [distributed] each rank answers a contiguous share of the records; the rows are gathered in record order
    rank, world = distributed.rank(), distributed.world_size()
    share = records[len(records) * rank // world : len(records) * (rank + 1) // world]
    with distributed.gathered(model):
        _, rows = evaluate.evaluate(model, processor, share, cfg.images, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.eval_batch_size, reward_config=reward_config(cfg),
                                    engine=engine, precision=precision)
    rows = [row for rank_rows in distributed.all_gather_objects(rows) for row in rank_rows]
    if rollout_log is not None:
        rollout_log.log_answers(step, records, rows)
    return evaluate.summarize(records, rows), rows


def evaluate_before(run: Run, eval_records: list[dict], records: list[dict], history: dict,
                    rollout_log: RolloutLog) -> tuple[list[dict] | None, list[dict]]:
    """The held-out eval before training (not again on resume) and the viewer's probes: held-out questions
    answered wrong before training, sampled again at each logged step. Returns (the rows, the probes)."""
    before_rows, groups = None, run.cfg.rollout_groups_per_log
    if eval_records and "before" not in history:
        history["before"], before_rows = evaluate_split(run.policy, run.processor, eval_records, run.cfg,
                                                        run.precision, run.engine, rollout_log, step=0)
        print("held-out before GRPO:\n" + evaluate.markdown_table({"before": history["before"]}))
        history["probe_ids"] = [row["id"] for row in before_rows if not row["correct"]][:groups]
    by_id = {record.get("id"): record for record in eval_records}
    return before_rows, [by_id[i] for i in history.get("probe_ids", [])] or records[:groups]


def evaluate_after(run: Run, eval_records: list[dict], history: dict, before_rows: list[dict] | None,
                   rollout_log: RolloutLog) -> None:
    """The held-out eval after training: eval.md and eval.json (for control.py and experiment.py), the table and
    one question answered before and after."""
    cfg = run.cfg
    history["after"], after_rows = evaluate_split(run.policy, run.processor, eval_records, cfg, run.precision,
                                                  run.engine, rollout_log, step=cfg.steps)
    table = evaluate.markdown_table({"before GRPO": history["before"], "after GRPO": history["after"]})
    if distributed.is_main():  # [distributed] rank 0 writes the files
        with open(os.path.join(cfg.out, "eval.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(cfg.out, "eval.json"), "w") as f:
            json.dump(history, f, indent=1)
    print("held-out accuracy (%), greedy:\n" + table)
    if before_rows is not None:
        print(evaluate.before_and_after(eval_records, before_rows, after_rows))


if __name__ == "__main__":
    run_script(main, GRPOConfig, __doc__)
