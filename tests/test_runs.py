"""What a run guarantees, tested the way a user meets it: reruns, two runs at once, kills, broken checkpoints,
changed settings on resume, NaN, and flags that cannot work (vlaa_min/infra/run_folder.py; train_sft.py and
train_grpo.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_grpo
import train_sft
from vlaa_min.infra.cli import UserError
from vlaa_min.infra.train_state import save_model
from vlaa_min.metrics import plot_curves
from vlaa_min.model import VLModel
from vlaa_min.toy_model import build_toy_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Which letter is right?\nA. one\nB. two\nC. three\nD. four"
TINY = dict(text_num_hidden_layers=1, text_hidden_size=32, text_intermediate_size=64, text_num_attention_heads=2,
            text_num_key_value_heads=1, text_mrope_section=[2, 3, 3], vision_depth=1, vision_out_hidden_size=32)


def _records(n: int, with_answer: bool) -> list[dict]:
    return [{"id": f"r{i}", "question": QUESTION, "gt": "C", "verifier_type": "mcq",
             **({"answer": f"<think>It is {'ABCD'[i % 4]}.</think> <answer>{'ABCD'[i % 4]}</answer>"}
                if with_answer else {})} for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "sft.json").write_text(json.dumps(_records(16, True)))
    (root / "rl.json").write_text(json.dumps(_records(8, False)))
    build_toy_checkpoint(str(root / "init"), str(root), vocab_size=300, seed=0, **TINY)
    return root


def _sft(root, out: str, **overrides) -> train_sft.SFTConfig:
    settings = dict(model=str(root / "init"), data=str(root / "sft.json"), images=str(root), out=str(root / out),
                    steps=3, batch_size=4, micro_batch_size=4, lr=1e-3, eval_size=4, eval_every=0, save_every=1,
                    max_length=1024, device="cpu")
    return train_sft.SFTConfig(**(settings | overrides))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def _same_weights(a, b) -> bool:
    sa, sb = VLModel.from_pretrained(a).state_dict(), VLModel.from_pretrained(b).state_dict()
    return all(torch.equal(t, sb[name]) for name, t in sa.items())


def _run_cli(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *flags], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_a_finished_run_is_never_rerun_into_without_resume_or_overwrite(world, capsys):
    train_sft.main(_sft(world, "rerun"))
    before = (world / "rerun" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=f"--out {world / 'rerun'} already holds a run.*--resume true.*--overwrite"):
        train_sft.main(_sft(world, "rerun", steps=2))
    assert (world / "rerun" / "metrics.jsonl").read_text() == before
    train_sft.main(_sft(world, "rerun", steps=2, overwrite=True))
    assert [row["step"] for row in _metrics(world / "rerun")] == [1, 2]
    assert sorted(os.listdir(world / "rerun" / "checkpoints")) == ["step_000001", "step_000002"]


def test_two_runs_never_share_a_folder_and_a_killed_runs_lock_is_taken_over(world, capfd):
    out = world / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               "from vlaa_min.infra.run_folder import take_lock; "
                               f"os.makedirs({str(out)!r}); lock = take_lock({str(out)!r}); print('locked', flush=True); "
                               "time.sleep(300)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another run \\(process {holder.pid}"):
            train_sft.main(_sft(world, "locked", overwrite=True))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    train_sft.main(_sft(world, "locked", overwrite=True))
    assert f"taking over the lock of process {holder.pid}" in capfd.readouterr().out
    assert (out / "model" / "config.json").exists()


def test_resume_refuses_settings_that_shape_training_and_allows_safe_ones(world, capsys):
    train_sft.main(_sft(world, "changed"))
    config = (world / "changed" / "config.json").read_text()
    refused = r"(?s)cannot resume .*--steps 4 \(trained with 3\).*--lr 0\.002 \(trained with 0\.001\)"
    with pytest.raises(UserError, match=refused):
        train_sft.main(_sft(world, "changed", resume=True, lr=2e-3, steps=4))
    assert (world / "changed" / "config.json").read_text() == config  # not overwritten with values not used

    changed_data = world / "sft-changed.json"
    changed_data.write_text(json.dumps(_records(16, True)[::-1]))  # same count, other content
    with pytest.raises(UserError, match="the content of --data"):
        train_sft.main(_sft(world, "changed", resume=True, data=str(changed_data)))

    train_sft.main(_sft(world, "changed", resume=True, eval_every=1))
    assert "resuming with --eval-every 1 (was 0)" in capsys.readouterr().out


def test_resume_falls_back_past_a_broken_checkpoint_and_cuts_a_torn_metrics_line(world, capsys):
    out = world / "broken"
    train_sft.main(_sft(world, "broken"))
    shutil.copytree(out / "model", world / "broken-straight")
    shutil.rmtree(out / "model")
    newest = out / "checkpoints" / "step_000003"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a write cut short
    (out / "checkpoints" / "step_000004.tmp-123-abcd").mkdir()  # a checkpoint write that was killed
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    train_sft.main(_sft(world, "broken", resume=True))
    printed = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: it does not load" in printed
    assert "resumed from" in printed and "step_000002 at step 2" in printed
    assert "step_000004.tmp-123-abcd, left by an interrupted write" in printed
    assert [row["step"] for row in _metrics(out)] == [1, 2, 3]
    assert _same_weights(world / "broken-straight", out / "model")  # the resumed run ends where it would have


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(world):
    with pytest.raises(UserError, match="step 2: loss is nan.*Last good checkpoint: .*step_000001"):
        train_sft.main(_sft(world, "nan", lr=1e30))  # the first update blows the weights up
    assert sorted(os.listdir(world / "nan" / "checkpoints")) == ["step_000001"]
    assert not (world / "nan" / "model").exists()


def test_the_final_model_folder_is_all_or_nothing(world, tmp_path):
    model = VLModel.from_pretrained(world / "init")

    class BrokenProcessor:
        def save_pretrained(self, path):
            raise OSError("No space left on device")

    with pytest.raises(OSError):
        save_model(str(tmp_path / "model"), model, BrokenProcessor())
    assert os.listdir(tmp_path) == []  # no model/ with weights but no tokenizer, and no temporary folder


def test_grpo_refuses_a_changed_group_size_on_resume(world):
    settings = dict(model=str(world / "init"), data=str(world / "rl.json"), images=str(world), eval_data=None,
                    out=str(world / "grpo"), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4,
                    train_batch_size=4, micro_batch_size=4, save_every=1, sample_every=0, device="cpu")
    train_grpo.main(train_grpo.GRPOConfig(**settings))
    with pytest.raises(UserError, match="--group-size 4 \\(trained with 2\\)"):
        train_grpo.main(train_grpo.GRPOConfig(**(settings | dict(resume=True, group_size=4, train_batch_size=8))))


@pytest.mark.parametrize("script, flags, message", [
    ("train_sft.py", ["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    ("train_grpo.py", ["--steps", "-3"], "--steps must be > 0, got -3"),
    ("evaluate.py", ["--eval-size", "-1"], "--eval-size must be >= 0, got -1"),
    ("train_sft.py", ["--model", "no/such/model"], "--model no/such/model: no such directory"),
])
def test_flags_that_cannot_work_get_one_line_naming_the_flag(script, flags, message, tmp_path):
    result = _run_cli(script, *flags, "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_plot_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_curves({"run": str(tmp_path / "metrics.jsonl")}, ["reward"], str(tmp_path / "c.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
