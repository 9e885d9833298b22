"""What a run guarantees, tested the way a user meets it: reruns, two runs at once, kills (kill -9 and SIGTERM, by
pid), broken checkpoints and metrics, changed settings on resume, --overwrite on a folder that is not a run, NaN,
and flags that cannot work (vlaa_min/infra/run_folder.py; train_sft.py and train_grpo.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rewards
import train_grpo
import train_sft
from rewards import math_check
from tests.helpers import running
from vlaa_min.infra.cli import ConfigError, UserError
from vlaa_min.infra.run_folder import release_lock, take_lock
from vlaa_min.infra.train_state import save_model
from vlaa_min.metrics import plot_curves
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor
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
    (root / "math.json").write_text(json.dumps([{"id": f"m{i}", "question": f"What is {i} + 1?", "gt": str(i % 3),
                                                 "verifier_type": "math"} for i in range(8)]))
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


def _answering(compute_rewards):
    """compute_rewards on an answer made from each completion's length: a random tiny model writes no <answer>
    block, and these give every step math checks in the worker processes, and rewards that differ."""
    def scored(texts, samples, config=None):
        return compute_rewards([f"<answer>{len(text) % 3}</answer>" for text in texts], samples, config=config)

    return scored


# train_grpo.py's command line, its rewards taken through _answering (the same code, run as a script)
ANSWERING_GRPO = ("import rewards, train_grpo\nfrom tests.test_runs import _answering\n"
                  "rewards.compute_rewards = _answering(rewards.compute_rewards)\n"
                  "from vlaa_min.infra.cli import run_script\n"
                  "run_script(train_grpo.main, train_grpo.GRPOConfig, train_grpo.__doc__)")


def _math_grpo(root, out: str, **overrides) -> dict:
    settings = dict(model=str(root / "init"), data=str(root / "math.json"), images=str(root), eval_data=None,
                    out=str(root / out), steps=8, prompts_per_step=4, group_size=2, max_new_tokens=4,
                    train_batch_size=8, micro_batch_size=8, lr=1e-3, save_every=1, sample_every=0, device="cpu")
    return settings | overrides


def _as_flags(settings: dict) -> list[str]:
    return [arg for name, value in settings.items()
            for arg in ("--" + name.replace("_", "-"), "none" if value is None else str(value))]


def _children(pid: int) -> list[int]:
    """The running processes whose parent is `pid`."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except FileNotFoundError:  # it ended meanwhile
            continue
        if int(parent) == pid and state != "Z":
            children.append(int(entry))
    return children


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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_grpo_run_stopped_by_a_signal_leaves_no_worker_and_resumes_to_the_same_weights(world, stop, monkeypatch,
                                                                                          capsys):
    settings = _math_grpo(world, f"stopped-{stop.name}")
    out = Path(settings["out"])
    run = subprocess.Popen([sys.executable, "-c", ANSWERING_GRPO, *_as_flags(settings)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        while not (out / "checkpoints" / "step_000002").exists():
            assert run.poll() is None, run.stderr.read()
            time.sleep(0.02)
        workers = _children(run.pid)  # the math-check workers, forked before and after the run took its lock
        assert len(workers) >= 2
        os.kill(run.pid, stop)
        stderr = run.communicate(timeout=60)[1]  # a worker that kept the run's stderr open would hang this
        deadline = time.monotonic() + 10
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, workers))
    finally:
        run.kill()
        for pid in filter(running, workers):  # only if the test failed: leave no process behind
            os.kill(pid, signal.SIGKILL)
    if stop == signal.SIGTERM:  # the clean stop, as Ctrl-C's
        assert run.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM; ")
    else:
        assert run.returncode == -signal.SIGKILL
    assert not (out / "model").exists()  # stopped before the end

    monkeypatch.setattr(rewards, "compute_rewards", _answering(rewards.compute_rewards))
    train_grpo.main(train_grpo.GRPOConfig(**(settings | {"resume": True})))  # not refused as "in use"
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", capsys.readouterr().out).group(1))
    assert 2 <= resumed_at < settings["steps"]
    assert [row["step"] for row in _metrics(out)] == list(range(1, settings["steps"] + 1))  # each step once
    train_grpo.main(train_grpo.GRPOConfig(**(settings | {"out": str(world / f"straight-{stop.name}")})))
    assert _same_weights(world / f"straight-{stop.name}" / "model", out / "model")


def test_a_math_worker_does_not_hold_the_runs_lock(tmp_path, monkeypatch):
    """flock's lock belongs to the open file, which a forked child shares: a worker left behind by a killed run
    would keep its lock. The child closes its copy."""
    lock = take_lock(str(tmp_path))
    try:
        monkeypatch.setattr(math_check, "_idle", [])  # the next check forks a worker now, while the lock is held
        assert math_check.check_math("1", "1", timeout_s=5.0) == "ok"
        worker = math_check._idle[-1].process.pid
        open_files = [os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")]
        assert open_files and str(tmp_path / ".lock") not in open_files
    finally:
        release_lock(lock)


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(world, tmp_path):
    photos = tmp_path / "photos"  # --out mistyped: a folder of the user's own files
    (photos / "2024").mkdir(parents=True)
    (photos / "holiday.jpg").write_bytes(b"not ours")
    flags = _as_flags(dict(model=str(world / "init"), data=str(world / "sft.json"), images=str(world), steps=1,
                           batch_size=4, micro_batch_size=4, eval_size=4, device="cpu"))
    result = _run_cli("train_sft.py", *flags, "--out", str(photos), "--overwrite", "true")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--out {photos} does not hold only a run: it holds 2024, holiday.jpg; --overwrite true acts only on " \
           f"a folder a run made, so nothing was deleted or written" in result.stderr
    assert sorted(os.listdir(photos)) == ["2024", "holiday.jpg"]
    assert (photos / "holiday.jpg").read_bytes() == b"not ours"

    model = tmp_path / "model"  # a model folder has a config.json too, but not a run's
    shutil.copytree(world / "init", model)
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(UserError, match="it holds config.json \\(not a run's\\), generation_config.json"):
            train_sft.main(_sft(world, str(model), resume=resume, overwrite=overwrite))  # an absolute --out
    assert sorted(os.listdir(model)) == sorted(os.listdir(world / "init"))

    train_sft.main(_sft(world, "run-and-notes", steps=1))
    (world / "run-and-notes" / "notes.txt").write_text("my notes")  # a run, and a file no run writes
    with pytest.raises(UserError, match="it holds notes.txt;"):
        train_sft.main(_sft(world, "run-and-notes", steps=1, overwrite=True))
    assert (world / "run-and-notes" / "notes.txt").read_text() == "my notes"
    (world / "run-and-notes" / "notes.txt").unlink()
    train_sft.main(_sft(world, "run-and-notes", steps=1, overwrite=True))  # a run alone is replaced


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


def test_a_corrupt_line_inside_metrics_stops_the_resume_with_its_line_and_changes_nothing(world):
    out = world / "corrupt"
    train_sft.main(_sft(world, "corrupt", save_every=2))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "lo\x00\x00ss": \n'  # a bad sector or a stray write, not a torn last line
    (out / "metrics.jsonl").write_text("".join(lines))
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(UserError, match=f"^{out / 'metrics.jsonl'}:2: not a JSON object .*delete or repair that "
                                        f"line"):
        train_sft.main(_sft(world, "corrupt", save_every=2, resume=True))
    assert (out / "metrics.jsonl").read_text() == "".join(lines)
    assert sorted(os.listdir(out / "checkpoints")) == checkpoints


def test_the_weights_file_is_as_readable_as_the_other_files(world, tmp_path):
    save_model(str(tmp_path / "model"), VLModel.from_pretrained(world / "init"),
               Processor.from_pretrained(world / "init"))
    (tmp_path / "plain.txt").write_text("")  # the mode this process gives a new file
    assert os.stat(tmp_path / "model" / "model.safetensors").st_mode == os.stat(tmp_path / "plain.txt").st_mode


def test_grpo_stops_with_the_step_and_cause_when_blown_up_weights_give_nan(world, monkeypatch):
    monkeypatch.setattr(rewards, "compute_rewards", _answering(rewards.compute_rewards))
    settings = _math_grpo(world, "grpo-nan", lr=1e30, steps=3)  # the first update blows the weights up
    with pytest.raises(UserError, match="^step 2: sample_logprobs is nan; training stopped before the update. "
                                        "Last good checkpoint: .*step_000001$"):
        train_grpo.main(train_grpo.GRPOConfig(**settings))
    assert sorted(os.listdir(world / "grpo-nan" / "checkpoints")) == ["step_000001"]


def test_grpo_stops_with_one_line_when_the_open_scorer_fails(world, monkeypatch):
    monkeypatch.setattr(rewards, "compute_rewards", _answering(rewards.compute_rewards))
    (world / "open.json").write_text(json.dumps([{"id": f"o{i}", "question": "Describe the image.",
                                                   "gt": "a red circle", "verifier_type": "open"} for i in range(4)]))
    settings = _math_grpo(world, "grpo-scorer", data=str(world / "open.json"),
                          open_scorer="tests.helpers:FailingScorer", log_rollouts_every=0)
    with pytest.raises(UserError, match="^step 1: record o.: the open scorer FailingScorer.score raised "
                                        "ConnectionError: .* refused the connection; training stopped"):
        train_grpo.main(train_grpo.GRPOConfig(**settings))
    # With the rollout log on, the viewer's probes are scored before step 1: the same line stops the run there.
    settings.update(out=str(world / "grpo-scorer-probes"), log_rollouts_every=1)
    with pytest.raises(UserError, match="^record o.: the open scorer FailingScorer.score raised ConnectionError"):
        train_grpo.main(train_grpo.GRPOConfig(**settings))


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
    ("train_grpo.py", ["--min-lr-ratio", "-1"], "--min-lr-ratio must be >= 0, got -1.0"),  # a negative lr at the end
    ("evaluate.py", ["--eval-size", "-1"], "--eval-size must be >= 0, got -1"),
    ("train_sft.py", ["--model", "no/such/model"], "--model no/such/model: no such directory"),
])
def test_flags_that_cannot_work_get_one_line_naming_the_flag(script, flags, message, tmp_path):
    result = _run_cli(script, *flags, "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_sft_refuses_a_negative_lr_floor():
    with pytest.raises(ConfigError, match="--min-lr-ratio must be >= 0, got -1"):
        train_sft.SFTConfig(min_lr_ratio=-1)


def test_without_matplotlib_the_plot_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_curves({"run": str(tmp_path / "metrics.jsonl")}, ["reward"], str(tmp_path / "c.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
