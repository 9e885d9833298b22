"""Evaluate a checkpoint on a split in the VLAA-Thinking format: accuracy per reward type and reasoning statistics.

The answer extraction and reward rules are exactly the training ones (rewards/): the single <answer> block is the
answer, anything else scores 0 ("format"). Per reward type we report accuracy (reward == 1; for iou: IoU >= 0.5, the
usual detection threshold) and the mean reward (for iou: the mean IoU), plus the share of format failures, the mean
response length in tokens, the paper's "aha" word counts (substring match, lower-cased), and reasoning: a response
"reasons" when its <think> block takes two or more steps (sentences); the summary gives the share that reason,
the accuracy of reasoned and of direct responses, and on toy records whether the steps give the answer.

With --samples k > 1 (temperature sampling) it also reports pass@k with the unbiased estimator of Chen et al.
(2021): pass@k = 1 - C(n - c, k) / C(n, k) per question (n samples, c correct), averaged, and mean@k (the mean
accuracy over the samples).

Paper vs here: the paper evaluates with VLMEvalKit on six math benchmarks (max_new_tokens 800, falling back to the
whole response when there is no answer block). We evaluate any split converted to the VLAA-Thinking record format
with the training reward rules (no fallback: a missing answer block is wrong, as in training).

Each evaluation writes results.json and results.md into a folder of its own (by default <model>/eval-<split>-<N>q,
with -t<temperature>x<samples> when sampled) and refuses one that already holds results unless --overwrite true.

    python evaluate.py --model runs/grpo/model --data toy/test.json --images toy/images --eval-size 500   (= make eval)
    python evaluate.py --model runs/grpo/model --data toy/test.json --samples 8 --temperature 0.8 --show 5
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import rewards
import toyworld
from vlaa_min.generate import Engine, SamplingParams
from vlaa_min.infra.cli import ConfigError, UserError, check_sizes, print_config, run_script
from vlaa_min.infra.run_folder import check_model_dir, check_out_folder
from vlaa_min.infra.runtime import autocast, resolve_device, resolve_dtype
from vlaa_min.model import VLModel
from vlaa_min.presets import TOY_OPEN_SCORER
from vlaa_min.processor import Processor


@dataclass
class EvalConfig:
    model: str = field(default="runs/grpo/model", metadata={"help": "HF-format checkpoint directory"})
    data: str = field(default="toy/test.json", metadata={"help": "records to evaluate (JSON or JSONL)"})
    images: str = field(default="toy/images", metadata={"help": "images root of the records"})
    eval_size: int = field(default=0, metadata={"help": "evaluate the first N records (0 = all; make eval: 500, "
                                                        "make grpo's held-out ones)"})
    samples: int = field(default=1, metadata={"help": "responses per question (k for pass@k / mean@k)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (then --samples must be 1)"})
    max_new_tokens: int = field(default=800, metadata={"help": "the paper's evaluation budget"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    max_pixels: int = field(default=0, metadata={"help": "cap on an image's resized area (0 = the model's "
                                                         "preprocessor_config.json)"})
    require_think: bool = field(default=False, metadata={"help": "also demand one <think> block (not the paper)"})
    open_scorer: str | None = field(default=TOY_OPEN_SCORER, metadata={
        "help": "open-ended scorer, module:attr (default: the toy world's; none = token F1 with gt)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU), fp32, bf16"})
    out: str | None = field(default=None, metadata={"help": "directory for results.json and results.md "
                                                             "(default: <model>/eval-<split>-<N>q[-t<T>x<k>])"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results --out already holds"})
    show: int = field(default=0, metadata={"help": "print N responses next to their references"})
    skip_bad: bool = field(default=False, metadata={"help": "skip invalid records (reported) instead of failing"})

    def __post_init__(self):
        check_sizes(self, positive=("samples", "max_new_tokens", "batch_size"),
                    non_negative=("eval_size", "temperature", "max_pixels"))
        if self.temperature == 0 and self.samples != 1:
            raise ConfigError("greedy decoding (--temperature 0) gives one response per question; use --samples 1")


def aha_count(text: str) -> int:
    lowered = text.lower()
    return sum(lowered.count(word) for word in data.AHA_WORDS)


_THINK = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)
_STEP_END = re.compile(r"[.!?](?:\s+|$)")  # a sentence ends at . ! or ? before a space or the end


def reasoning_steps(text: str) -> int:
    """The sentences in the response's first <think> block: 0 or 1 is a direct answer, 2 or more is reasoning."""
    think = _THINK.search(text)
    return len(_STEP_END.findall(think.group(1).strip() + " ")) if think else 0


def reasons(text: str) -> bool:
    """Whether a response reasons before it answers: its <think> block takes two or more steps."""
    return reasoning_steps(text) >= 2


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: list[dict], rows: list[dict], samples: int = 1) -> dict:
    """Aggregate evaluate's rows (`samples` per record, record-major) into the report."""
    reasoning = [reasons(r["response"]) for r in rows]  # (len(rows),) does each response reason first?
    by_type: dict[str, dict] = {}
    for index, record in enumerate(records):
        scored = rows[index * samples : (index + 1) * samples]
        row = by_type.setdefault(record["verifier_type"], {"n": 0, "correct": 0.0, "reward": 0.0, "pass": 0.0,
                                                            "reasons": 0.0, "length": 0.0})
        correct = sum(r["correct"] for r in scored)
        row["n"] += 1
        row["correct"] += correct / samples
        row["reward"] += sum(r["reward"] for r in scored) / samples
        row["pass"] += pass_at_k(samples, correct, samples)
        row["reasons"] += sum(reasoning[index * samples : (index + 1) * samples]) / samples
        row["length"] += sum(r["length"] for r in scored) / samples
    per_type = {t: {"n": row["n"], "accuracy": row["correct"] / row["n"], "mean_reward": row["reward"] / row["n"],
                    f"pass@{samples}": row["pass"] / row["n"], "reasoning_share": row["reasons"] / row["n"],
                    "mean_length": row["length"] / row["n"]} for t, row in sorted(by_type.items())}
    total = sum(row["n"] for row in by_type.values())
    texts = [r["response"] for r in rows]
    reasoned = [r for r, reasoned in zip(rows, reasoning) if reasoned]
    direct = [r for r, reasoned in zip(rows, reasoning) if not reasoned]
    # Toy records only: of the reasoned responses whose steps can be checked, the share whose answer they give.
    agree = [toyworld.steps_agree(row["response"], records[i // samples]) for i, row in enumerate(rows)
             if reasoning[i] and records[i // samples].get("meta", {}).get("source") == "toyworld"]
    agree = [a for a in agree if a is not None]
    return {
        "n": total,
        "samples_per_question": samples,
        "accuracy": sum(row["correct"] for row in by_type.values()) / max(total, 1),
        f"pass@{samples}": sum(row["pass"] for row in by_type.values()) / max(total, 1),
        "per_type": per_type,
        "format_failure": sum(r["reason"] == "format" for r in rows) / max(len(rows), 1),
        "mean_length": sum(r["length"] for r in rows) / max(len(rows), 1),
        "aha_per_response": sum(aha_count(t) for t in texts) / max(len(texts), 1),
        "aha_share": sum(aha_count(t) > 0 for t in texts) / max(len(texts), 1),
        "reasoning_share": len(reasoned) / max(len(rows), 1),
        # Accuracy of the reasoned and of the direct responses (None when there are none of that kind).
        "accuracy_reasoned": sum(r["correct"] for r in reasoned) / len(reasoned) if reasoned else None,
        "accuracy_direct": sum(r["correct"] for r in direct) / len(direct) if direct else None,
        "steps_agree": sum(agree) / len(agree) if agree else None,
    }


@torch.no_grad()
def evaluate(model, processor, records: list[dict], images_root: str, *, samples: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 800, batch_size: int = 32, reward_config=None, seed: int = 0, engine=None,
             precision: torch.dtype = torch.float32, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate for every record, score with the training rewards; returns (summary, per-response rows)."""
    device = next(model.parameters()).device
    engine = engine or Engine(model, pad_token_id=processor.special_ids["pad_token_id"])
    params = SamplingParams.for_processor(processor, max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                                          greedy=temperature == 0)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    rows = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = records[start : start + batch_size]
        batch = data.collate_prompts(chunk, processor, images_root).to(device)
        with autocast(device, precision):
            rollout = engine.generate(batch, samples, params, generator)
        for p, record in enumerate(chunk):
            texts, lens = [], []
            for g in range(samples):
                row = p * samples + g
                n = int(rollout.completion_lengths[row])
                texts.append(processor.decode(rollout.completion_ids[row, :n].tolist()))
                lens.append(n)
            try:
                scored = rewards.compute_rewards(texts, [record] * samples, config=reward_config)
            except rewards.ScorerError as error:  # the --open-scorer failed: one line, not a traceback
                raise UserError(str(error)) from None
            cut = rollout.finish_reasons[p * samples : (p + 1) * samples]
            rows.extend({"id": record.get("id"), "type": record["verifier_type"], "question": record["question"],
                         "gt": record["gt"], "response": t, **s, "length": n, "truncated": reason == "length"}
                        for t, s, n, reason in zip(texts, scored, lens, cut))
    model.train(was_training)
    return summarize(records, rows, samples), rows


def before_and_after(records: list[dict], before: list[dict], after: list[dict]) -> str:
    """One held-out question answered before and after training, picked to show the change: wrong and direct
    before, right and reasoned after (else any wrong -> right pair); greedy rows of `evaluate`, one per record."""
    pairs = [(r, b, a) for r, b, a in zip(records, before, after) if not b["correct"] and a["correct"]]
    if not pairs:
        return "no held-out question went from wrong to right"
    record, b, a = next((p for p in pairs if not reasons(p[1]["response"]) and reasons(p[2]["response"])), pairs[0])
    return (f"one held-out question, before and after:\n  [{record['verifier_type']}] "
            f"{record['question'].splitlines()[0]}   (reference: {record['gt']})\n"
            f"  before: {b['response']}\n  after:  {a['response']}")


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def markdown_table(summaries: dict[str, dict]) -> str:
    """One row per {label: summary}: the questions it was scored on, overall and per-type accuracy, format
    failures, length, the share of responses that reason, the share of checkable reasoned responses whose steps
    give their answer, aha words."""
    types = sorted({t for s in summaries.values() for t in s["per_type"]})
    header = ["model", "questions", "overall"] + types + ["format fail", "mean length", "reasons", "steps agree",
                                                          "aha / response"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        cells = [name, f"{s['n']:,}", f"{100 * s['accuracy']:.1f}"]
        cells += [f"{100 * s['per_type'][t]['accuracy']:.1f}" if t in s["per_type"] else "-" for t in types]
        cells += [f"{100 * s['format_failure']:.1f}%", f"{s['mean_length']:.0f}",
                  _percent(s.get("reasoning_share")), _percent(s.get("steps_agree")), f"{s['aha_per_response']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_folder(cfg: EvalConfig, questions: int) -> str:
    """--out, or a folder of its own for this evaluation inside the model's: eval-test-500q, eval-test-500q-t0.8x8."""
    if cfg.out:
        return cfg.out
    split = os.path.splitext(os.path.basename(cfg.data))[0]
    sampled = f"-t{cfg.temperature:g}x{cfg.samples}" if cfg.temperature else ""
    return os.path.join(cfg.model, f"eval-{split}-{questions}q{sampled}")


def main(cfg: EvalConfig) -> dict:
    print_config(cfg)
    check_model_dir(cfg.model)
    device = resolve_device(cfg.device)
    precision = resolve_dtype(cfg.precision, device)
    reward_config = rewards.RewardConfig(require_think=cfg.require_think, open_scorer=cfg.open_scorer)
    records = data.load_records(cfg.data, cfg.images, skip_bad=cfg.skip_bad, reward_config=reward_config)
    if cfg.eval_size > len(records):
        raise ConfigError(f"--eval-size {cfg.eval_size} is more than the {len(records)} records of {cfg.data}")
    records = records[: cfg.eval_size] if cfg.eval_size else records
    out = results_folder(cfg, len(records))
    check_out_folder(out, resume=False, overwrite=cfg.overwrite, holds="results", resumable=False)  # before generating
    processor = Processor.from_pretrained(cfg.model, cfg.max_pixels)
    model = VLModel.from_pretrained(cfg.model, dtype=torch.float32 if device.type == "cpu" else precision,
                                    device=device)
    summary, rows = evaluate(model, processor, records, cfg.images, samples=cfg.samples, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                             reward_config=reward_config, seed=cfg.seed, precision=precision)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": vars(cfg), "summary": summary, "responses": rows}, f, indent=1)
    table = markdown_table({os.path.normpath(cfg.model): summary})
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    for row in rows[: cfg.show]:
        print(f"\n[{row['type']}] {row['question']}\n  reference: {row['gt']}\n  response:  {row['response']}\n"
              f"  reward {row['reward']:.2f} ({row['reason']})")
    print("\n" + table)
    print(f"results in {out}/results.json and results.md")
    return summary


if __name__ == "__main__":
    run_script(main, EvalConfig, __doc__)
