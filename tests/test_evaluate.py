"""evaluate.py: a policy that always answers the reference scores 1; pass@k matches the unbiased estimator by hand;
a run of evaluate.py writes a results folder of its own, labelled with the model and the question count, and never
over an earlier one unless told."""

import dataclasses
import json
import math

import pytest
import torch

import evaluate
import rewards
import toyworld
from vlaa_min.generate import Rollout
from vlaa_min.infra.cli import ConfigError, UserError
from vlaa_min.processor import Processor
from vlaa_min.tokenizer import build_tokenizer
from vlaa_min.toy_model import build_toy_checkpoint


class ReferenceScorer:
    """A stub open-ended scorer fed the references: full marks exactly for the reference text."""

    relative = False

    def score(self, answer: str, sample: dict) -> float:
        return float(answer.strip() == sample["gt"].strip())


class ReplayEngine:
    """Stands in for Engine: answers each prompt with "<answer>{gt}</answer>" (then <|im_end|>), in order."""

    def __init__(self, processor: Processor, records: list[dict]):
        self.processor, self.queue = processor, list(records)

    def generate(self, batch, num_samples, params, generator) -> Rollout:
        count = batch.input_ids.shape[0]
        answers, self.queue = self.queue[:count], self.queue[count:]
        rows = [self.processor.tokenizer.encode(f"<answer>{r['gt']}</answer>", add_special_tokens=False)
                + [self.processor.eos_token_id] for r in answers for _ in range(num_samples)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.processor.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(row) for row in rows])
        return Rollout(completion_ids=ids, completion_lengths=lengths, finished_by_stop=torch.ones(len(rows), dtype=torch.bool),
                       finish_reasons=["stop"] * len(rows), logprobs=torch.zeros(ids.shape),
                       prompt_index=torch.arange(count).repeat_interleave(num_samples))


def test_always_answering_the_reference_scores_one(tmp_path):
    records = toyworld.generate_split(20, seed=5, image_dir=str(tmp_path / "images"), prefix="eval")
    processor = Processor(build_tokenizer([r["question"] for r in records] + [r["gt"] for r in records], 400))
    model = torch.nn.Linear(1, 1)  # only its device is read: the replay engine does the generating
    config = rewards.RewardConfig(open_scorer=ReferenceScorer())
    summary, rows = evaluate.evaluate(model, processor, records, str(tmp_path / "images"), samples=2,
                                        temperature=1.0, batch_size=6, reward_config=config,
                                        engine=ReplayEngine(processor, records), progress=False)
    assert summary["accuracy"] == 1.0 and summary["pass@2"] == 1.0
    assert set(summary["per_type"]) == {"digit", "mcq", "math", "iou", "open"}
    assert all(row["reward"] == 1.0 for row in rows) and len(rows) == 40
    assert summary["format_failure"] == 0.0 and summary["aha_per_response"] == 0.0


def test_an_open_scorer_that_fails_stops_the_evaluation_with_one_line(tmp_path):
    records = [r for r in toyworld.generate_split(20, seed=5, image_dir=str(tmp_path / "images"), prefix="eval")
               if r["verifier_type"] == "open"][:2]
    processor = Processor(build_tokenizer([r["question"] for r in records] + [r["gt"] for r in records], 400))
    config = rewards.RewardConfig(open_scorer="tests.helpers:FailingScorer")
    with pytest.raises(UserError, match=f"^record {records[0]['id']}: the open scorer FailingScorer.score raised "
                                        f"ConnectionError: "):
        evaluate.evaluate(torch.nn.Linear(1, 1), processor, records, str(tmp_path / "images"), reward_config=config,
                          engine=ReplayEngine(processor, records), progress=False)


def test_eval_writes_its_own_labelled_results_folder_and_never_over_one(tmp_path):
    records = toyworld.generate_split(6, seed=5, image_dir=str(tmp_path / "images"), prefix="eval")
    (tmp_path / "test.json").write_text(json.dumps(records))
    model = build_toy_checkpoint(str(tmp_path / "model"), str(tmp_path), vocab_size=300, text_num_hidden_layers=1,
                                 text_hidden_size=32, text_intermediate_size=64, text_num_attention_heads=2,
                                 text_num_key_value_heads=1, text_mrope_section=[2, 3, 3], vision_depth=1,
                                 vision_out_hidden_size=32)
    config = evaluate.EvalConfig(model=model, data=str(tmp_path / "test.json"), images=str(tmp_path / "images"),
                                   eval_size=4, max_new_tokens=4, batch_size=4, device="cpu")
    summary = evaluate.main(config)
    out = tmp_path / "model" / "eval-test-4q"  # the split's name and the questions scored
    assert summary["n"] == 4 == json.loads((out / "results.json").read_text())["summary"]["n"]
    header, _, row = (out / "results.md").read_text().splitlines()
    assert header.split(" | ")[:3] == ["| model", "questions", "overall"]
    assert row.split(" | ")[:2] == [f"| {model}", "4"]
    with pytest.raises(UserError, match=f"--out {out} already holds results: replace it with --overwrite true"):
        evaluate.main(config)
    evaluate.main(dataclasses.replace(config, overwrite=True))
    evaluate.main(dataclasses.replace(config, eval_size=0))  # all 6: another folder
    assert json.loads((out.with_name("eval-test-6q") / "results.json").read_text())["summary"]["n"] == 6
    with pytest.raises(ConfigError, match="--eval-size 7 is more than the 6 records"):
        evaluate.main(dataclasses.replace(config, eval_size=7))


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 2), (5, 0, 3), (5, 4, 2), (8, 3, 8), (10, 1, 4)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    # Probability that a random k-subset of the n samples holds at least one of the c correct ones.
    subsets_without_correct = math.comb(n - c, k) if n - c >= k else 0
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(1 - subsets_without_correct / math.comb(n, k))


def test_pass_at_k_by_hand():
    assert evaluate.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert evaluate.pass_at_k(4, 0, 2) == 0.0
    assert evaluate.pass_at_k(4, 3, 2) == 1.0  # every pair holds a correct sample
    with pytest.raises(ValueError):
        evaluate.pass_at_k(2, 1, 3)


def test_aha_words_are_counted_as_substrings():
    assert evaluate.aha_count("Wait, let me double-check. Hmm, check again.") == 6  # check twice (in double-check)


def test_a_response_reasons_when_its_think_block_takes_two_steps():
    assert evaluate.reasoning_steps("<think>I see 2 red shapes.</think> <answer>2</answer>") == 1
    assert evaluate.reasoning_steps("<think>red: 1. blue: 2. That makes 3 shapes.</think> <answer>3</answer>") == 3
    assert evaluate.reasoning_steps("<think>The box is [0.25, 0.50, 0.75, 1.00].</think>") == 1  # no step in 0.25
    assert evaluate.reasoning_steps("<answer>2</answer>") == 0
    assert not evaluate.reasons("<think>I see 2 red shapes.</think>")
    assert evaluate.reasons("<think>Red: 2. So 2! </think>")


def _row(response: str, correct: bool, kind: str = "digit") -> dict:
    return {"response": response, "correct": correct, "reward": float(correct), "reason": "ok", "length": 10,
            "type": kind}


def test_summary_splits_accuracy_by_reasoned_and_direct_and_checks_toy_steps():
    question = "How many red shapes are there?"
    records = [{"verifier_type": "digit", "question": question, "gt": "2",
                "meta": {"source": "toyworld", "template": "count_color"}}] * 4
    trace = "red: 2. green: 0. blue: 1. yellow: 0. So there are 2 red shapes."
    rows = [_row(f"<think>{trace}</think> <answer>2</answer>", True),
            _row(f"<think>{trace}</think> <answer>3</answer>", False),  # its own steps say 2
            _row("<think>I see 2 red shapes.</think> <answer>2</answer>", True),
            _row("<think>I see 4 red shapes.</think> <answer>4</answer>", False)]
    summary = evaluate.summarize(records, rows)
    assert summary["reasoning_share"] == 0.5 and summary["per_type"]["digit"]["reasoning_share"] == 0.5
    assert summary["accuracy_reasoned"] == 0.5 and summary["accuracy_direct"] == 0.5
    assert summary["steps_agree"] == 0.5
    assert "| reasons |" in evaluate.markdown_table({"m": summary}) and "| 50% |" in \
        evaluate.markdown_table({"m": summary})


def test_before_and_after_prefers_a_direct_miss_turned_reasoned_hit():
    records = [{"verifier_type": "digit", "question": f"q{i}", "gt": "2"} for i in range(3)]
    before = [_row("<think>I see 4.</think> <answer>4</answer>", False)] * 3
    after = [_row("<think>I see 2.</think> <answer>2</answer>", True),
             _row("<think>red: 2. So 2.</think> <answer>2</answer>", True), before[2]]
    text = evaluate.before_and_after(records, before, after)
    assert "q1" in text and "red: 2. So 2." in text
    assert "no held-out question" in evaluate.before_and_after(records, before, before)
