"""The paper's SFT-vs-RL study in miniature, on the toy world: one command, one table, one figure.

Runs, all from the same toy "instruct" base (`make base`), SFT with the "toy-sft" preset and every GRPO run with
the "toy" one (vlaa_min/presets.py):
    base                  the starting point (evaluated only)
    sft-clean             SFT on clean reasoning traces, one for every record (oracle traces)
    sft-verified          SFT on the clean traces the paper's pipeline would keep from the sloppy teacher (step 5)
    sft-pseudo            SFT on hesitant "pseudo reasoning" traces (R1's imitated hesitations)
    grpo                  GRPO from the base                     (the paper: best)
    sft-clean+grpo        GRPO after clean SFT
    sft-verified+grpo     GRPO after verified SFT                (the paper: SFT then GRPO ends lower)
    sft-pseudo+grpo       GRPO after pseudo SFT                  (the paper: SFT then GRPO ends lower)
and writes <out>/results.md (held-out accuracy per reward type, response length, the share that reasons, whether
the steps agree with the answer, aha words per response) and <out>/curves.png (reward, accuracy, reasoning share and
response length of the four GRPO runs: the paper's Fig. 6 in miniature).
Finished runs are reused, and an interrupted one resumes from its last checkpoint.

    make experiment            # = python experiment.py --base runs/base/model --out runs/experiment
"""

import json
import os
from dataclasses import dataclass, field

import evaluate
import train_grpo
import train_sft
from vlaa_min.infra.cli import parse_config, print_config
from vlaa_min.metrics import plot_curves
from vlaa_min.presets import make_config


@dataclass
class ExperimentConfig:
    base: str = field(default="runs/base/model", metadata={"help": "the toy instruct base (make base)"})
    toy: str = field(default="toy", metadata={"help": "toy world directory (make data)"})
    out: str = field(default="runs/experiment", metadata={"help": "where every run and the report go"})
    grpo_steps: int = field(default=80, metadata={"help": "GRPO rollout steps (the same for every GRPO run)"})
    grpo_max_new_tokens: int = field(default=256, metadata={"help": "completion budget: traces are long after SFT"})
    eval_size: int = field(default=500, metadata={"help": "held-out records evaluated"})


def run_sft(cfg: ExperimentConfig, name: str, data_file: str) -> str:
    out = os.path.join(cfg.out, name)
    if not os.path.exists(os.path.join(out, "model", "config.json")):
        train_sft.main(make_config(train_sft.SFTConfig, "toy-sft", model=cfg.base,
                                   data=os.path.join(cfg.toy, data_file), images=os.path.join(cfg.toy, "images"),
                                   out=out, eval_every=0, save_every=50, resume=True))
    return os.path.join(out, "model")


def run_grpo(cfg: ExperimentConfig, name: str, model: str) -> dict:
    out = os.path.join(cfg.out, name)
    history_file = os.path.join(out, "history.json")
    if not os.path.exists(history_file):
        history = train_grpo.main(make_config(
            train_grpo.GRPOConfig, "toy", model=model, data=os.path.join(cfg.toy, "rl.json"),
            images=os.path.join(cfg.toy, "images"), eval_data=os.path.join(cfg.toy, "test.json"),
            eval_size=cfg.eval_size, out=out, steps=cfg.grpo_steps, max_new_tokens=cfg.grpo_max_new_tokens,
            save_every=20, resume=True))
        with open(history_file, "w") as f:
            json.dump(history, f)
    with open(history_file) as f:
        return json.load(f)


def main(cfg: ExperimentConfig) -> str:
    print_config(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    sft_models = {"sft-clean": run_sft(cfg, "sft-clean", "sft.json"),
                  "sft-verified": run_sft(cfg, "sft-verified", "sft_verified.json"),
                  "sft-pseudo": run_sft(cfg, "sft-pseudo", "sft_pseudo.json")}
    histories = {"grpo": run_grpo(cfg, "grpo", cfg.base)}
    for name, model in sft_models.items():
        histories[f"{name}+grpo"] = run_grpo(cfg, f"{name}+grpo", model)

    # Every GRPO run evaluated its start and its end on the same held-out split with the same rules.
    summaries = {"base": histories["grpo"]["before"]}
    summaries.update({name: histories[f"{name}+grpo"]["before"] for name in sft_models})
    summaries.update({name: history["after"] for name, history in histories.items()})
    table = evaluate.markdown_table(summaries)
    report = os.path.join(cfg.out, "results.md")
    with open(report, "w") as f:
        f.write("Held-out accuracy (%) per reward type, greedy decoding; mean response length in tokens.\n\n")
        f.write(table + "\n")
    png = plot_curves({name: os.path.join(cfg.out, name, "metrics.jsonl") for name in histories},
                      ["reward", "accuracy", "reasoning_share", "completion_length"],
                      os.path.join(cfg.out, "curves.png"), title="GRPO from the base vs after SFT (toy world)")
    print(table)
    print(f"report: {report}  figure: {png}")
    return report


if __name__ == "__main__":
    main(parse_config(ExperimentConfig, description=__doc__.split("\n")[0]))
