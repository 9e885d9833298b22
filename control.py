"""The control that makes GRPO's gain RL's own: the same base, trained as long with more SFT on its own data.

A gain after GRPO could come from any extra training. So the control continues the base's own recipe (its saved
config: data, batch size, ..., at the learning rate its cosine schedule ended at, held constant) for as long as the GRPO run trained:
the sum of its steps' generate + reward + train seconds, turned into SFT steps with the base run's own mean step
time (evaluations excluded on both sides). Then it evaluates the result greedily on the GRPO run's held-out records
with the same rules, and prints the three rows: the base, the base + GRPO, the base + the same time of SFT.

On the toy world the base's data is the flawed teacher's (toyworld.py), so more SFT can only imitate it better,
while GRPO's reward pays for the right answer: the control measures how much of the gain is the reward's.

    python control.py --base runs/base --grpo runs/grpo --out runs/grpo-control     (make grpo runs it)
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

import data
import eval as evaluation
import train_grpo
import train_sft
from vlaa_min.cli import UserError, load_config, print_config, run_script
from vlaa_min.metrics import read_metrics
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor
from vlaa_min.runtime import resolve_device, resolve_dtype


@dataclass
class ControlConfig:
    base: str = field(default="runs/base", metadata={"help": "the base's SFT run folder (make base)"})
    grpo: str = field(default="runs/grpo", metadata={"help": "the GRPO run folder to match (it starts from base)"})
    out: str = field(default="runs/grpo-control", metadata={"help": "run folder of the control (replaced if there)"})


def grpo_train_seconds(rows: list[dict]) -> float:
    """A GRPO run's training time: its steps' rollout, reward and update seconds (no evaluation)."""
    return sum(row["time_generate"] + row["time_reward"] + row["time_train"] for row in rows)


def control_steps(grpo_seconds: float, base_rows: list[dict]) -> int:
    """How many of the base recipe's SFT steps take grpo_seconds, at the base run's mean step time."""
    times = [row["step_time_s"] for row in base_rows if "step_time_s" in row]
    if not times:
        raise UserError("the base run's metrics.jsonl has no step_time_s: train the base again with this code")
    return max(1, round(grpo_seconds / (sum(times) / len(times))))


def main(cfg: ControlConfig) -> dict:
    print_config(cfg)
    base_cfg = load_config(train_sft.SFTConfig, os.path.join(cfg.base, "config.json"))
    grpo_cfg = load_config(train_grpo.GRPOConfig, os.path.join(cfg.grpo, "config.json"))
    eval_json = os.path.join(cfg.grpo, "eval.json")
    if not os.path.exists(eval_json):
        raise UserError(f"{eval_json} is missing: control.py needs a finished GRPO run with held-out evaluations")
    with open(eval_json) as f:
        history = json.load(f)
    grpo_seconds = grpo_train_seconds(read_metrics(os.path.join(cfg.grpo, "metrics.jsonl")))
    steps = control_steps(grpo_seconds, read_metrics(os.path.join(cfg.base, "metrics.jsonl")))
    print(f"GRPO trained for {grpo_seconds:.0f} s: the control gets {steps} SFT steps of the base recipe")

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
    summary, _ = train_grpo.evaluate_split(model, Processor.from_pretrained(model_dir), None, records, grpo_cfg,
                                        train_grpo.reward_config(grpo_cfg), resolve_dtype(grpo_cfg.precision, device))
    rows = {"base": history["before"], f"+ GRPO ({grpo_cfg.steps} steps)": history["after"],
            f"+ SFT on its own data, as long ({steps} steps)": summary}
    table = evaluation.markdown_table(rows)
    with open(os.path.join(cfg.out, "eval.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out, "eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    before = history["before"]["accuracy"]
    print(f"held-out accuracy (%), greedy, {len(records)} questions:\n{table}")
    print(f"gain over the base: GRPO {100 * (history['after']['accuracy'] - before):+.1f} points, "
          f"the same time of SFT {100 * (summary['accuracy'] - before):+.1f}")
    return rows


if __name__ == "__main__":
    run_script(main, ControlConfig, __doc__)
