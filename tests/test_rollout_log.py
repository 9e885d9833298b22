"""The rollout log (vlaa_min/rollout_log.py): its fields and per-token values, its size bound, and resume.

The per-token values are checked against their definitions: ratio = exp(log pi_new - log pi_old) and the k3 KL
exp(d) - d - 1 with d = log pi_ref - log pi_new.
"""

import json
import math

import pytest
import torch

from train_grpo import StepBatch
from vlaa_min.generate import Rollout
from vlaa_min.rollout_log import RolloutLog, token_pieces


class ByteTokenizer:
    """Token id = one byte of UTF-8 (ids >= 256 are special tokens shown as <s>), decoded like a BPE tokenizer:
    bytes that do not yet form a character become U+FFFD."""

    def decode(self, ids, skip_special_tokens=False):
        text = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        specials = "" if skip_special_tokens else "<s>" * sum(i >= 256 for i in ids)
        return text + specials


def _step_inputs(prompts: int, group_size: int, seed: int):
    """A fake rollout of prompts x group_size completions of varied lengths, with rewards and log-probs."""
    generator = torch.Generator().manual_seed(seed)
    n, width = prompts * group_size, 6
    lengths = torch.randint(2, width + 1, (n,), generator=generator)
    ids = torch.randint(97, 123, (n, width), generator=generator)  # a-z
    old = -torch.rand(n, width, generator=generator)
    rollout = Rollout(completion_ids=ids, completion_lengths=lengths, finished_by_stop=lengths < width,
                      finish_reasons=["stop" if int(k) < width else "length" for k in lengths], logprobs=old,
                      prompt_index=torch.arange(n) // group_size)
    records = [{"id": f"p{seed}-{p}", "question": f"how many? {p}", "gt": "3", "verifier_type": "digit",
                "image": f"img{p}.png"} for p in range(prompts)]
    rewards = [float(g % 2) if p > 0 else 1.0 for p in range(prompts) for g in range(group_size)]  # prompt 0: all 1
    scored = [{"reward": r, "reason": "ok" if r else "wrong", "correct": r == 1.0} for r in rewards]
    texts = [ByteTokenizer().decode(ids[i, : int(lengths[i])].tolist()) for i in range(n)]
    advantages = torch.randn(n, generator=generator)
    new = old + 0.1 * torch.randn(n, width, generator=generator)
    ref = old + 0.1 * torch.randn(n, width, generator=generator)
    return dict(records=records, rollout=rollout, texts=texts, scores=scored, advantages=advantages,
                ref_logp=ref, tokenizer=ByteTokenizer(), rescore=lambda ids: new[ids]), new


def _log_step(log: RolloutLog, step: int, inputs: dict, **kwargs) -> dict:
    """log_rollout on a StepBatch made of a fake step's fields."""
    fields = {key: inputs[key] for key in ("records", "rollout", "texts", "scores", "advantages", "ref_logp")}
    return log.log_rollout(step, StepBatch(prompts=[], **fields), inputs["tokenizer"], inputs["rescore"], **kwargs)


def test_token_pieces_join_to_the_text_and_hold_split_characters_back():
    tokenizer = ByteTokenizer()
    ids = list("añ€b".encode()) + [256]  # ñ is two bytes, € three, then a special token
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == "añ€b<s>"
    assert pieces == ["a", "", "ñ", "", "", "€", "b", "<s>"]
    cut = list("a€".encode())[:-1]  # a completion that ends inside a character
    assert "".join(token_pieces(tokenizer, cut)) == tokenizer.decode(cut) == "a\ufffd"


def test_a_logged_step_has_every_field_and_the_defined_token_values(tmp_path):
    log = RolloutLog(str(tmp_path / "rollouts.jsonl"), every=5, groups=2)
    inputs, new = _step_inputs(prompts=3, group_size=4, seed=0)
    _log_step(log, 5, inputs, kl_estimator="k3")
    [entry] = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert entry["step"] == 5 and entry["kind"] == "train" and entry["kl_to"] == "reference"
    assert [g["id"] for g in entry["groups"]] == ["p0-0", "p0-1"]  # the first `groups` prompts
    assert [g["no_signal"] for g in entry["groups"]] == [True, False]
    rollout, old, ref = inputs["rollout"], inputs["rollout"].logprobs, inputs["ref_logp"]
    for p, group in enumerate(entry["groups"]):
        assert group["image"] == f"img{p}.png" and group["gt"] == "3" and group["type"] == "digit"
        assert len(group["completions"]) == 4
        for g, c in enumerate(group["completions"]):
            row = p * 4 + g
            n = int(rollout.completion_lengths[row])
            assert c["text"] == inputs["texts"][row] == "".join(c["tokens"])
            assert c["length"] == n == len(c["tokens"]) == len(c["logp"]) == len(c["ratio"]) == len(c["kl"])
            assert c["truncated"] == (rollout.finish_reasons[row] == "length")
            assert c["reward"] == inputs["scores"][row]["reward"] and c["reason"] == inputs["scores"][row]["reason"]
            assert c["advantage"] == pytest.approx(float(inputs["advantages"][row]), abs=1e-4)
            for t in range(n):
                d = float(ref[row, t] - new[row, t])
                assert c["logp"][t] == pytest.approx(float(old[row, t]), abs=1e-3)
                assert c["ratio"][t] == pytest.approx(math.exp(float(new[row, t] - old[row, t])), abs=1e-4)
                assert c["kl"][t] == pytest.approx(math.exp(d) - d - 1, abs=1e-5)


def test_without_a_reference_the_kl_is_to_the_rollout_policy(tmp_path):
    log = RolloutLog(str(tmp_path / "rollouts.jsonl"), every=1, groups=1)
    inputs, new = _step_inputs(prompts=2, group_size=2, seed=1)
    entry = _log_step(log, 1, {**inputs, "ref_logp": None}, kl_estimator="k1")
    c = entry["groups"][0]["completions"][0]
    old = inputs["rollout"].logprobs
    assert entry["kl_to"] == "rollout policy"
    assert c["kl"][0] == pytest.approx(float(new[0, 0] - old[0, 0]), abs=1e-5)  # k1: log pi_new - log pi_old


def _answer(reward: float) -> dict:
    return {"response": f"<answer>{reward}</answer>", "reward": reward, "reason": "ok" if reward else "wrong",
            "correct": reward == 1.0, "length": 5, "truncated": False}


def test_probe_answers_are_groups_with_their_advantages(tmp_path):
    log = RolloutLog(str(tmp_path / "rollouts.jsonl"), every=1, groups=2)
    records = [{"id": f"q{p}", "question": "q", "gt": "1", "verifier_type": "digit"} for p in range(3)]
    rows = [_answer(r) for r in (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0)]  # 3 records x 3 samples
    entry = log.log_answers(7, records, rows, kind="probe", samples=3)
    assert entry["kind"] == "probe" and [g["id"] for g in entry["groups"]] == ["q0", "q1"]  # `groups` prompts
    first, second = entry["groups"]
    # rewards (1, 0, 0): mean 1/3, sample std sqrt(1/3), so A = (2/3) / sqrt(1/3) and -(1/3) / sqrt(1/3)
    expected = [(2 / 3) / math.sqrt(1 / 3), -(1 / 3) / math.sqrt(1 / 3), -(1 / 3) / math.sqrt(1 / 3)]
    assert [c["advantage"] for c in first["completions"]] == pytest.approx(expected, abs=1e-4)
    assert not first["no_signal"] and second["no_signal"]
    held_out = log.log_answers(7, records, rows, samples=1)  # greedy: one answer per record
    assert [len(g["completions"]) for g in held_out["groups"]] == [1, 1, 1]  # up to groups x 4 records
    assert "advantage" not in held_out["groups"][0]["completions"][0]


def _run(log: RolloutLog, steps: range, seed: int = 0) -> None:
    for step in steps:
        if log.due(step):
            _log_step(log, step, _step_inputs(prompts=4, group_size=3, seed=step + seed)[0])


def test_the_log_size_is_bounded_by_every_and_groups(tmp_path):
    log = RolloutLog(str(tmp_path / "rollouts.jsonl"), every=5, groups=2)
    _run(log, range(1, 23))
    entries = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert [e["step"] for e in entries] == [5, 10, 15, 20]  # 22 steps // 5
    for entry in entries:
        assert len(entry["groups"]) == 2  # of 4 prompts
        for group in entry["groups"]:
            assert len(group["completions"]) == 3
            assert all(len(c["tokens"]) == c["length"] <= 6 for c in group["completions"])
    off = RolloutLog(str(tmp_path / "off.jsonl"), every=0, groups=2)  # 0 = no log at all
    assert not off.due(5)
    record = {"id": "t0", "question": "q", "gt": "1", "verifier_type": "digit"}
    assert off.log_answers(5, [record], [_answer(1.0)]) is None
    assert (tmp_path / "off.jsonl").read_text() == ""


def test_resume_drops_the_entries_past_the_checkpoint_and_appends(tmp_path):
    path = str(tmp_path / "rollouts.jsonl")
    straight = RolloutLog(path, every=2, groups=1)
    _run(straight, range(1, 9))
    evaluation = [{"response": "<answer>3</answer>", "reward": 1.0, "reason": "ok", "correct": True, "length": 5,
                   "truncated": False}]
    straight.log_answers(8, [{"id": "t0", "question": "q", "gt": "3", "verifier_type": "digit"}], evaluation)
    with open(path, "a") as f:
        f.write('{"step": 10, "kind": "tr')  # a crash mid-write
    resumed = RolloutLog(path, every=2, groups=1, resume_step=4)  # the checkpoint holds steps 1..4
    assert [json.loads(line)["step"] for line in open(path)] == [2, 4]
    _run(resumed, range(5, 9))
    steps = [json.loads(line)["step"] for line in open(path)]
    assert steps == [2, 4, 6, 8]
    RolloutLog(path, every=2, groups=1)  # a new run (no resume) starts the file again
    assert open(path).read() == ""
