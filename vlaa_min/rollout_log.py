"""The rollout log: what GRPO saw at a few steps, for the viewer (python -m vlaa_min.view runs/grpo).

train_grpo.py writes <out>/rollouts.jsonl, one JSON object per logged step:

    {"step": 10, "kind": "train", "kl_to": "reference", "groups": [
        {"id", "question", "gt", "type", "image", "no_signal",      # the prompt; no_signal: all G rewards equal
         "completions": [{"text", "reward", "reason", "correct", "advantage", "length", "truncated",
                          "tokens": [...], "logp": [...], "ratio": [...], "kl": [...]}]}]}   # one value per token

Per token: the text piece, log pi_old (the rollout policy), and, re-scored right after the step's update, the
ratio pi_new / pi_old and the KL estimate of pi_new against the reference (against pi_old when there is none).
A training step is logged every `every` steps, its first `groups` groups (the sampler's order is random), and
with it kind "probe": G fresh samples (same seed each time) for each of `groups` fixed prompts (train_grpo picks
held-out questions the base answered wrong, and once at step 0, before any update), so that one prompt can be
seen early and late; held-out answers (kind "eval", greedy) are logged at each eval. Probes and evals have no
per-token values. So the file holds at most 2 x steps / every + 1 entries of groups x G completions of at most
max_new_tokens tokens each, plus the evals. On resume the entries past the resumed step are dropped, as
metrics.jsonl's lines are.
"""

import math

import torch

from vlaa_min.grpo_loss import equal_reward_groups, group_advantages, kl_per_token
from vlaa_min.metrics import MetricsLogger


def token_pieces(tokenizer, ids: list[int], context: int = 4) -> list[str]:
    """Each token's share of the decoded text (special tokens kept), so that "".join(pieces) is the text.

    Token k's piece is decode(window + k) minus decode(window), with the same few tokens of left context in both
    (which keeps a tokenizer's word-start spaces right) and linear cost. A token that ends inside a multi-byte
    character gets "" and the token that completes it the whole character.
    """
    def decode(start: int, end: int) -> str:
        return tokenizer.decode(ids[start:end], skip_special_tokens=False)

    pieces, pending = [], 0  # ids[pending:] have no text in pieces yet
    for k in range(len(ids)):
        left = max(0, pending - context)
        before, after = decode(left, pending), decode(left, k + 1)
        if after.endswith("\ufffd") or not after.startswith(before):
            pieces.append("")
            continue
        pieces.append(after[len(before):])
        pending = k + 1
    if pending < len(ids):  # cut inside a character: the last token shows what there is
        left = max(0, pending - context)
        pieces[-1] = decode(left, len(ids))[len(decode(left, pending)):]
    return pieces


def _rounded(values: torch.Tensor, digits: int) -> list[float]:
    """Floats for JSON, rounded to keep the file small; a non-finite value becomes None (JSON has no inf)."""
    return [round(v, digits) if math.isfinite(v) else None for v in values.tolist()]


def _prompt(record: dict, no_signal: bool) -> dict:
    image = record.get("image")
    if isinstance(image, (list, tuple)):  # several images: the viewer shows the first
        image = image[0] if image else None
    return {"id": record.get("id"), "question": record.get("question"), "gt": record.get("gt"),
            "type": record.get("verifier_type"), "image": image or None, "no_signal": no_signal}


class RolloutLog:
    def __init__(self, path: str, every: int, groups: int, resume_step: int | None = None):
        if every < 0 or groups < 0:
            raise ValueError(f"rollout log: every ({every}) and groups ({groups}) must be >= 0 (0 = no log)")
        self.every, self.groups = every, groups
        self.file = MetricsLogger(path, resume_step=resume_step)  # the same append / truncate-on-resume rules

    def due(self, step: int) -> bool:
        return self.every > 0 and self.groups > 0 and step % self.every == 0

    @torch.no_grad()
    def log_rollout(self, step: int, batch, tokenizer, rescore, kl_estimator: str = "k3") -> dict:
        """Log the first groups of a step's rollout (on the host). batch: train_grpo.StepBatch (records, rollout,
        texts, scores, advantages, ref_logp: (N, L) or None); rescore(ids) gives the (n, width) log-probs of those
        completions under the updated policy."""
        records, rollout, texts, scores = batch.records, batch.rollout, batch.texts, batch.scores
        group_size = len(texts) // len(records)
        shown = min(self.groups, len(records))
        ids = torch.arange(shown * group_size)  # completions p * G + g of the first `shown` prompts
        new_logp = rescore(ids).float().cpu()  # (n, width)
        width = new_logp.shape[1]
        old_logp = rollout.logprobs[ids, :width].float()  # (n, width)
        ref_logp = batch.ref_logp
        anchor = ref_logp[ids.to(ref_logp.device), :width].float().cpu() if ref_logp is not None else old_logp
        ratio = torch.exp(new_logp - old_logp)  # (n, width)
        kl = kl_per_token(new_logp, anchor, kl_estimator)  # (n, width)
        groups = []
        for p in range(shown):
            completions = []
            for i in range(p * group_size, (p + 1) * group_size):
                n = int(rollout.completion_lengths[i])
                score = scores[i]
                completions.append({
                    "text": texts[i], "reward": round(score["reward"], 4), "reason": score["reason"],
                    "correct": bool(score["correct"]), "advantage": round(float(batch.advantages[i]), 4),
                    "length": n, "truncated": rollout.finish_reasons[i] == "length",
                    "tokens": token_pieces(tokenizer, rollout.completion_ids[i, :n].tolist()),
                    "logp": _rounded(old_logp[i, :n], 3), "ratio": _rounded(ratio[i, :n], 4),
                    "kl": _rounded(kl[i, :n], 5)})
            group_rewards = [scores[i]["reward"] for i in range(p * group_size, (p + 1) * group_size)]
            no_signal = bool(equal_reward_groups(torch.tensor([group_rewards]))[0])
            groups.append({**_prompt(records[p], no_signal=no_signal),
                           "completions": completions})
        entry = {"step": step, "kind": "train", "kl_to": "reference" if ref_logp is not None else "rollout policy",
                 "groups": groups}
        self.file.log(entry)
        return entry

    def log_answers(self, step: int, records: list[dict], rows: list[dict], kind: str = "eval",
                    samples: int = 1) -> dict | None:
        """Log evaluate.evaluate's rows (`samples` per record, record-major) as groups without per-token values.

        kind "eval": held-out answers, at most groups x 4 records; kind "probe": the fixed prompts that
        train_grpo samples again at each logged step, so that the viewer can show one prompt early and late."""
        if self.every == 0 or self.groups == 0:
            return None
        shown = min(len(records), self.groups * 4 if kind == "eval" else self.groups)
        groups = []
        for p in range(shown):
            answers = rows[p * samples : (p + 1) * samples]
            rewards = torch.tensor([row["reward"] for row in answers])
            advantages = group_advantages(rewards[None]).flatten().tolist() if samples > 1 else [None] * samples
            completions = [{"text": row["response"], "reward": round(row["reward"], 4), "reason": row["reason"],
                            "correct": bool(row["correct"]), "length": row.get("length"),
                            "truncated": row.get("truncated")} for row in answers]
            for completion, advantage in zip(completions, advantages):
                if advantage is not None:
                    completion["advantage"] = round(advantage, 4)
            no_signal = samples > 1 and bool(equal_reward_groups(rewards[None])[0])
            groups.append({**_prompt(records[p], no_signal=no_signal), "completions": completions})
        entry = {"step": step, "kind": kind, "groups": groups}
        self.file.log(entry)
        return entry
