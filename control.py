"""The control that makes GRPO's gain RL's own: the same base, given as many more samples of SFT on its own data.

A gain after GRPO could come from any extra training. So the control continues the base's own recipe (its saved
config: data, batch size, ..., at the learning rate its cosine schedule ended at, held constant) on as many
samples as GRPO's updates trained on. Every update pass sees each kept rollout row once, so GRPO trained on
steps x prompts_per_step x group_size x mu samples (with --drop-zero-std-groups: the kept groups' rows, from its
metrics.jsonl), read from the GRPO run's saved config, so its overrides (`make grpo ARGS="--steps 5"`) count;
they become SFT steps of the base recipe's batch size. Samples, not seconds: the control's row is then
reproducible and does not follow the machine's load (sized by time, a GRPO run slowed by other work would get a
longer control); the base run's step time only gives the printed ETA. Then it evaluates the result greedily on
the GRPO run's held-out records with the same rules, and prints the three rows: the base, the base + GRPO, the
base + as many samples of SFT.

On the toy world the base's data is the flawed teacher's (toyworld.py), so more SFT can only imitate it better,
while GRPO's reward pays for the right answer: the control measures how much of the gain is the reward's.

    python control.py --base runs/base --grpo runs/grpo --out runs/grpo-control    (make grpo; CONTROL=0 skips it)
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

import data
import evaluate
import train_grpo
import train_sft
from vlaa_min.infra.cli import UserError, load_config, print_config, run_script
from vlaa_min.infra.runtime import resolve_device, resolve_dtype
from vlaa_min.metrics import read_metrics
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor


@dataclass
class ControlConfig:
    base: str = field(default="runs/base", metadata={"help": "the base's SFT run folder (make base)"})
    grpo: str = field(default="runs/grpo", metadata={"help": "the GRPO run folder to match (it starts from base)"})
    out: str = field(default="runs/grpo-control", metadata={"help": "run folder of the control (replaced if there)"})


def grpo_trained_samples(grpo_cfg: "train_grpo.GRPOConfig", rows: list[dict]) -> int:
    """The samples GRPO's updates trained on: each kept rollout row once per pass, mu passes per step."""
    rollout = grpo_cfg.prompts_per_step * grpo_cfg.group_size
    if not grpo_cfg.drop_zero_std_groups:
        return grpo_cfg.steps * rollout * grpo_cfg.mu
    if len(rows) != grpo_cfg.steps:
        raise UserError(f"the GRPO run's metrics.jsonl has {len(rows)} steps, its config {grpo_cfg.steps}: is it "
                        f"finished?")
    # frac_reward_zero_std is a share of the step's prompts, so each row keeps a whole number of groups
    kept = sum(round(grpo_cfg.prompts_per_step * (1 - row["frac_reward_zero_std"])) for row in rows)
    return kept * grpo_cfg.group_size * grpo_cfg.mu


def control_steps(samples: int, batch_size: int) -> int:
    """The SFT steps of batch_size samples that train on `samples` samples (at least one)."""
    return max(1, round(samples / batch_size))


def eta(steps: int, base_rows: list[dict]) -> str:
    """'about N min' at the base run's mean step time (a forecast only: the load may differ now)."""
    times = [row["step_time_s"] for row in base_rows if "step_time_s" in row]
    if not times:
        return "time unknown (no step_time_s in the base's metrics)"
    seconds = steps * sum(times) / len(times)
    return f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {seconds:.0f} s"


def main(cfg: ControlConfig) -> dict:
    print_config(cfg)
    base_cfg = load_config(train_sft.SFTConfig, os.path.join(cfg.base, "config.json"))
    grpo_cfg = load_config(train_grpo.GRPOConfig, os.path.join(cfg.grpo, "config.json"))
    eval_json = os.path.join(cfg.grpo, "eval.json")
    if not os.path.exists(eval_json):
        raise UserError(f"{eval_json} is missing: control.py needs a finished GRPO run with held-out evaluations")
    with open(eval_json) as f:
        history = json.load(f)
    samples = grpo_trained_samples(grpo_cfg, read_metrics(os.path.join(cfg.grpo, "metrics.jsonl")))
    steps = control_steps(samples, base_cfg.batch_size)
    print(f"control: {steps:,} SFT steps of {base_cfg.batch_size} samples (= the {samples:,} samples GRPO trained "
          f"on), {eta(steps, read_metrics(os.path.join(cfg.base, 'metrics.jsonl')))}")

    # The base's own recipe, continued from its final model at the learning rate its schedule ended with.
    model_dir = train_sft.main(dataclasses.replace(
        base_cfg, model=os.path.join(cfg.base, "model"), out=cfg.out, steps=steps,
        lr=base_cfg.lr * base_cfg.min_lr_ratio, warmup_ratio=0.0, min_lr_ratio=1.0, eval_every=0, save_every=0,
        resume=False, overwrite=True))

    # Evaluated as the GRPO run evaluated itself: its held-out records, length budget and reward rules.
    records = data.load_records(grpo_cfg.eval_data, grpo_cfg.images)
    records = records[: grpo_cfg.eval_size] if grpo_cfg.eval_size else records
    device = resolve_device(grpo_cfg.device)
    model = VLModel.from_pretrained(model_dir, dtype=torch.float32, device=device)
    summary, _ = train_grpo.evaluate_split(model, Processor.from_pretrained(model_dir), records, grpo_cfg,
                                           resolve_dtype(grpo_cfg.precision, device))
    rows = {"base": history["before"], f"+ GRPO ({grpo_cfg.steps} steps)": history["after"],
            f"+ SFT on its own data, as many samples ({steps} steps)": summary}
    table = evaluate.markdown_table(rows)
    with open(os.path.join(cfg.out, "eval.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out, "eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    before = history["before"]["accuracy"]
    print(f"held-out accuracy (%), greedy, {len(records)} questions:\n{table}")
    print(f"gain over the base: GRPO {100 * (history['after']['accuracy'] - before):+.1f} points, "
          f"as many samples of SFT {100 * (summary['accuracy'] - before):+.1f}")
    if grpo_cfg.log_rollouts_every:
        print(f"the GRPO run's rollouts: make view RUN={cfg.grpo}, then open {cfg.grpo}/rollouts.html")
    return rows


if __name__ == "__main__":
    run_script(main, ControlConfig, __doc__)
