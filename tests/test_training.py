"""End-to-end training on a trivial verifiable task: SFT teaches the format, GRPO learns the answer.

The task: every question is a four-option multiple choice whose right answer is always "C". SFT on answers
drawn uniformly from A-D teaches the <answer> format but no preference (accuracy near chance, 1/4); GRPO with
the mcq reward must then move the policy to "C". Also checked here: exact resume of both trainers (fp32, CPU),
and that a checkpoint written by SFT loads in transformers with the same logits. Every run is pinned to the CPU
(fp32), so that the bounds and the exact-resume checks mean the same on a machine with a GPU.
"""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import control
import data
import toyworld
import train_grpo
import train_sft
from vlaa_min.infra.cli import UserError, load_config, parse_config, save_config
from vlaa_min.metrics import read_metrics
from vlaa_min.model import VLModel
from vlaa_min.presets import make_config
from vlaa_min.processor import Processor
from vlaa_min.toy_model import build_toy_checkpoint

QUESTION = "Which letter is right?\nA. one\nB. two\nC. three\nD. four"
TINY = dict(text_num_hidden_layers=2, text_hidden_size=64, text_intermediate_size=128, text_num_attention_heads=2,
            text_num_key_value_heads=1, text_mrope_section=[4, 6, 6], vision_depth=1, vision_out_hidden_size=64)


def _records(n: int, seed: int, with_answer: bool) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        record = {"id": f"r{seed}-{i}", "question": QUESTION, "gt": "C", "verifier_type": "mcq"}
        if with_answer:
            letter = rng.choice("ABCD")
            record["answer"] = f"<think>It is {letter}.</think> <answer>{letter}</answer>"
        records.append(record)
    return records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trivial")
    splits = {"sft": _records(256, 0, True), "rl": _records(64, 1, False), "test": _records(32, 2, False)}
    for name, records in splits.items():
        (root / f"{name}.json").write_text(json.dumps(records))
    build_toy_checkpoint(str(root / "init"), str(root), vocab_size=300, seed=0, **TINY)
    sft_cfg = train_sft.SFTConfig(model=str(root / "init"), data=str(root / "sft.json"), images=str(root),
                                  out=str(root / "sft"), steps=150, batch_size=16, micro_batch_size=16, lr=3e-3,
                                  eval_size=16, eval_every=0, freeze_vision=False, device="cpu")
    train_sft.main(sft_cfg)
    return root


def _grpo_config(root, out: str, **overrides) -> train_grpo.GRPOConfig:
    settings = dict(model=str(root / "sft" / "model"), data=str(root / "rl.json"), images=str(root),
                    eval_data=str(root / "test.json"), eval_size=0, out=str(root / out), steps=20,
                    prompts_per_step=8, group_size=8, max_new_tokens=16, train_batch_size=64, micro_batch_size=32,
                    lr=2e-3, kl_init=0.0, save_every=0, sample_every=0, eval_batch_size=32, seed=0,
                    device="cpu")
    settings.update(overrides)
    return train_grpo.GRPOConfig(**settings)


def test_grpo_learns_a_verifiable_task(world):
    # Each rollout of 8 prompts in engine calls of 3, 3 and 2 (--rollout-batch-size; the toy recipe's test below
    # runs the default, one call).
    history = train_grpo.main(_grpo_config(world, "grpo", rollout_batch_size=3))
    rewards = [json.loads(line)["reward"] for line in open(world / "grpo" / "metrics.jsonl")]
    assert history["before"]["format_failure"] < 0.2, "SFT should have taught the <answer> format"
    # Sampled answers start near chance (1/4: SFT saw the four letters equally often) ...
    assert rewards[0] < 0.6
    # ... and GRPO moves the policy to the always-right answer.
    assert sum(rewards[-3:]) / 3 > 0.85
    assert history["after"]["accuracy"] > 0.95


def _assert_same_parameters(path_a, path_b) -> None:
    a, b = VLModel.from_pretrained(path_a).state_dict(), VLModel.from_pretrained(path_b).state_dict()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def _assert_resume_is_exact(main, config) -> None:
    """Run to the end; then make the run look as if it crashed right after its first checkpoint, resume it, and
    compare the final parameters with the uninterrupted run's."""
    out = Path(config.out)
    main(config)
    shutil.copytree(out / "model", out.with_name(out.name + "-straight"))
    for later in sorted((out / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    shutil.rmtree(out / "model")
    main(dataclasses.replace(config, resume=True))
    _assert_same_parameters(out.with_name(out.name + "-straight"), out / "model")


def test_grpo_resume_is_exact(world):
    config = _grpo_config(world, "resume-grpo", steps=4, eval_data=None, kl_init=1e-2, kl_target=5e-3, save_every=2,
                          train_batch_size=32, micro_batch_size=16)
    _assert_resume_is_exact(train_grpo.main, config)


def test_grpo_resumes_with_another_rollout_batch_size(world, capsys):
    """A run that ran out of memory in its rollout resumes with fewer prompts per engine call: a memory knob, not a
    setting that shapes training, so the resume accepts it and says so."""
    config = _grpo_config(world, "resume-rollout", steps=2, eval_data=None, save_every=1)
    train_grpo.main(config)
    shutil.rmtree(Path(config.out) / "checkpoints" / "step_000002")
    train_grpo.main(dataclasses.replace(config, resume=True, rollout_batch_size=3))
    assert "resuming with --rollout-batch-size 3 (was 0)" in capsys.readouterr().out
    assert [row["step"] for row in read_metrics(Path(config.out) / "metrics.jsonl")] == [1, 2]


def test_sft_resume_is_exact(world):
    config = train_sft.SFTConfig(model=str(world / "init"), data=str(world / "sft.json"), images=str(world),
                                 out=str(world / "resume-sft"), steps=6, batch_size=16, micro_batch_size=8, lr=3e-3,
                                 eval_size=16, eval_every=0, save_every=3, freeze_vision=False,
                                 device="cpu")
    _assert_resume_is_exact(train_sft.main, config)


def test_sft_checkpoint_loads_in_transformers_with_the_same_logits(world):
    from transformers import AutoModelForImageTextToText

    path = world / "sft" / "model"
    ours = VLModel.from_pretrained(path).eval()
    theirs = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = Processor.from_pretrained(path)
    batch = processor.collate_prompts([processor.encode_prompt(QUESTION, [])])
    with torch.no_grad():
        expected = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        got = ours(batch.input_ids, batch.position_ids, batch.attention_mask)
    assert torch.allclose(got, expected, atol=1e-4)


def test_sft_overfits_eight_samples(world, tmp_path):
    records = toyworld.generate_split(8, seed=11, image_dir=str(tmp_path / "images"), prefix="fit")
    (tmp_path / "fit.json").write_text(json.dumps(records))
    # A model that ignores the context can do no better than the unigram entropy of the target tokens;
    # memorising eight samples must go far below it.
    processor = Processor.from_pretrained(world / "init")
    targets = []
    for record in records:
        encoded = data.encode_sft(record, processor, tmp_path / "images")
        targets += [t for t, scored in zip(encoded.input_ids, encoded.loss_mask) if scored]
    counts = torch.tensor([targets.count(t) for t in set(targets)], dtype=torch.float64)
    unigram_entropy = float(-(counts / counts.sum() * torch.log(counts / counts.sum())).sum())

    train_sft.main(train_sft.SFTConfig(model=str(world / "init"), data=str(tmp_path / "fit.json"),
                                       eval_data=str(tmp_path / "fit.json"), images=str(tmp_path / "images"),
                                       out=str(tmp_path / "fit"), steps=300, batch_size=8, micro_batch_size=8,
                                       lr=3e-3, warmup_ratio=0.0, min_lr_ratio=1.0, eval_every=0,
                                       freeze_vision=False, device="cpu"))
    final = [json.loads(line) for line in open(tmp_path / "fit" / "metrics.jsonl")][-1]
    assert final["eval_loss"] < 0.1 * unigram_entropy, (final["eval_loss"], unigram_entropy)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy world, shared by the recipe's runs of both families."""
    root = tmp_path_factory.mktemp("toy")
    toyworld.build_world(str(root), {"base": 2000, "sft": 4, "rl": 600, "test": 300}, seed=0)
    return root


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_the_toy_recipe_learns(toy, tmp_path, model_type):
    """`make grpo` scaled down, for the toy model of each family (Qwen3-VL: DeepStack and interleaved MRoPE on the
    toy's images): a short base on the two teachers' answers, then GRPO with the default settings at half the
    prompts per step. The training reward and the share of responses that reason must rise, and held-out
    accuracy must move past its noise."""
    build_toy_checkpoint(str(tmp_path / "init"), str(toy), model_type)
    images = str(toy / "images")
    base = train_sft.main(train_sft.SFTConfig(
        model=str(tmp_path / "init"), data=str(toy / "base.json"), images=images,
        out=str(tmp_path / "base"), steps=700, batch_size=16, micro_batch_size=16, lr=1e-3, warmup_ratio=0.05,
        freeze_vision=False, eval_every=0, device="cpu"))
    history = train_grpo.main(train_grpo.GRPOConfig(
        model=base, data=str(toy / "rl.json"), images=images,
        eval_data=str(toy / "test.json"), eval_size=300, out=str(tmp_path / "grpo"), steps=40,
        prompts_per_step=16, train_batch_size=16, micro_batch_size=16, save_every=0, sample_every=0, device="cpu"))
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    before, after = history["before"]["accuracy"], history["after"]["accuracy"]
    # Two shares of n items differ by noise alone with a standard error of at most sqrt(2 * 0.25 / n); each gain
    # must be more than two of them.
    assert after - before > 2 * (0.5 / 300) ** 0.5, (before, after)
    first, last = rows[:5], rows[-5:]
    assert sum(r["reward"] for r in last) > sum(r["reward"] for r in first), [r["reward"] for r in rows]
    # The G samples of one prompt are not independent: count prompts, not samples (5 steps x 16 prompts).
    share_first, share_last = (sum(r["reasoning_share"] for r in part) / 5 for part in (first, last))
    assert share_last - share_first > 2 * (0.5 / (5 * 16)) ** 0.5, [r["reasoning_share"] for r in rows]


def test_control_trains_the_base_on_as_many_samples_as_grpo(world, capsys):
    grpo_cfg = _grpo_config(world, "control-grpo", steps=3)
    train_grpo.main(grpo_cfg)
    rows = control.main(control.ControlConfig(base=str(world / "sft"), grpo=str(world / "control-grpo"),
                                              out=str(world / "control")))
    base_cfg = json.loads((world / "sft" / "config.json").read_text())
    samples = grpo_cfg.steps * grpo_cfg.prompts_per_step * grpo_cfg.group_size * grpo_cfg.mu
    steps = read_metrics(world / "control" / "metrics.jsonl")
    assert len(steps) == samples // base_cfg["batch_size"]
    printed = capsys.readouterr().out
    assert (f"control: {len(steps)} SFT steps of {base_cfg['batch_size']} samples (= the {samples} samples GRPO "
            f"trained on), about ") in printed
    assert printed.count(f"make view RUN={world / 'control-grpo'}") == 2  # the ends of train_grpo.py and control.py
    assert {r["lr"] for r in steps} == {base_cfg["lr"] * base_cfg["min_lr_ratio"]}  # the base's final LR, held
    history = json.loads((world / "control-grpo" / "eval.json").read_text())
    assert list(rows.values())[:2] == [history["before"], history["after"]]
    assert list(rows.values())[2]["n"] == history["before"]["n"]  # the same held-out records


def test_the_control_follows_the_grpo_runs_saved_config_not_the_clock(tmp_path):
    """`make grpo ARGS="--steps 5"`: control.py reads the run's saved config, so 5 steps get 1/16 of the control of
    the default 80, whatever the machine's load; with --drop-zero-std-groups only the kept groups count."""
    base = make_config(train_sft.SFTConfig, "toy-base")
    planned = {}
    for argv in (["--steps", "5"], []):
        save_config(parse_config(train_grpo.GRPOConfig, ["--preset", "toy", *argv]), str(tmp_path / "config.json"))
        saved = load_config(train_grpo.GRPOConfig, str(tmp_path / "config.json"))
        samples = control.grpo_trained_samples(saved, [])
        assert samples == saved.steps * saved.prompts_per_step * saved.group_size * saved.mu
        planned[saved.steps] = control.control_steps(samples, base.batch_size)
    default_steps = train_grpo.GRPOConfig.steps
    assert planned[5] * default_steps // 5 == planned[default_steps]
    assert control.control_steps(1, base.batch_size) == 1  # never an empty control

    dropping = dataclasses.replace(saved, steps=2, mu=2, drop_zero_std_groups=True)
    rows = [{"frac_reward_zero_std": 0.25}, {"frac_reward_zero_std": 1.0}]  # 3/4 of the groups kept, then none
    kept_groups = dropping.prompts_per_step * 3 // 4
    assert control.grpo_trained_samples(dropping, rows) == kept_groups * dropping.group_size * dropping.mu
    with pytest.raises(UserError, match="is it finished"):
        control.grpo_trained_samples(dropping, rows[:1])
