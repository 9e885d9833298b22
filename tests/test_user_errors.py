"""Failures a user reads in one line, met the way a user meets them: the scripts' command lines with bad data,
a bad --model (one process and two gloo processes under torchrun), over-long SFT samples, a byte that is not
UTF-8 in the pipeline's input, and a refused resume's lock. Each checks the exit code, that stderr holds the
one-line message and no traceback, and that nothing was written or lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import pipeline
import train_grpo
import train_sft
from pipeline.cli import main as pipeline_main
from vlaa_min.infra.cli import EXPECTED_ERROR, run_script
from vlaa_min.processor import Processor
from vlaa_min.toy_model import build_toy_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Which letter is right?\nA. one\nB. two\nC. three\nD. four"
TINY = dict(text_num_hidden_layers=1, text_hidden_size=32, text_intermediate_size=64, text_num_attention_heads=2,
            text_num_key_value_heads=1, text_mrope_section=[2, 3, 3], vision_depth=1, vision_out_hidden_size=32)
LONG_THOUGHT = "It is C, since " + "one two three four " * 20


def _record(i: int, thought: str = "It is C.") -> dict:
    return {"id": f"r{i}", "question": QUESTION, "gt": "C", "verifier_type": "mcq",
            "answer": f"<think>{thought}</think> <answer>C</answer>"}


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    _write_jsonl(root / "good.jsonl", [_record(i) for i in range(8)])
    bad = [_record(i) for i in range(8)]
    del bad[2]["question"]  # line 3
    _write_jsonl(root / "bad.jsonl", bad)
    (root / "corpus.json").write_text(json.dumps([_record(i) for i in range(8)]))  # the toy tokenizer's texts
    build_toy_checkpoint(str(root / "init"), str(root), vocab_size=300, seed=0, **TINY)
    return root


def _cli(script, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a script's command line in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    config_cls = {train_sft: train_sft.SFTConfig, train_grpo: train_grpo.GRPOConfig, evaluate: evaluate.EvalConfig}
    code = 0
    try:
        run_script(script.main, config_cls[script], script.__doc__)
    except SystemExit as exited:
        code = exited.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _sft_flags(world, out: str, data: str = "good.jsonl", max_length: int = 1024) -> list[str]:
    return ["--model", str(world / "init"), "--data", str(world / data), "--images", str(world), "--out",
            str(world / out), "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--eval-size", "2",
            "--eval-every", "0", "--max-length", str(max_length), "--device", "cpu"]


# ----------------------------------------------------------------------------------------------------------------
# Bad data and bad paths: one line, exit code 2, nothing written


@pytest.mark.parametrize("script, flags", [
    (train_grpo, ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                  "--train-batch-size", "4", "--micro-batch-size", "4", "--eval-data", "none"]),
    (evaluate, ["--max-new-tokens", "4"]),
    (train_sft, ["--steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--eval-size", "2"]),
])
def test_a_bad_record_prints_one_line_naming_file_line_id_and_field(script, flags, world, monkeypatch, capsys):
    out = world / f"bad-{script.__name__}"
    argv = ["--model", str(world / "init"), "--data", str(world / "bad.jsonl"), "--images", str(world), "--out",
            str(out), "--device", "cpu", *flags]
    code, _, stderr = _cli(script, argv, monkeypatch, capsys)
    assert code == EXPECTED_ERROR
    assert _error_lines(stderr) == [f"error: {world / 'bad.jsonl'}:3 [id r2]: question: missing"]
    assert "Traceback" not in stderr and not out.exists()


def test_a_bad_record_as_a_subprocess_has_no_traceback(world):
    result = subprocess.run([sys.executable, "train_grpo.py", "--model", str(world / "init"), "--data",
                             str(world / "bad.jsonl"), "--images", str(world), "--out", str(world / "bad-cli"),
                             "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == EXPECTED_ERROR
    assert result.stderr.strip() == f"error: {world / 'bad.jsonl'}:3 [id r2]: question: missing"
    assert not (world / "bad-cli").exists()


def test_a_bad_model_path_under_two_torchrun_processes_prints_one_line_per_process(tmp_path):
    """Through vlaa_min.infra.launch, as `make grpo NPROC=2 MODEL=/nonexistent` runs it: each rank prints its one
    line and exits with 2; torchrun adds no ChildFailedError traceback and exits with 2."""
    command = [sys.executable, "-m", "vlaa_min.infra.launch", "--standalone", "--nproc_per_node", "2",
               "train_grpo.py", "--model", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out"),
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=180,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    message = f"error: --model {tmp_path / 'nonexistent'}: no such directory (a local checkpoint folder is needed)"
    lines = result.stderr.splitlines()
    assert result.returncode == EXPECTED_ERROR, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    # torchrun may stop the second rank before it prints (one line then, and its note that it stopped it)
    assert 1 <= lines.count(message) <= 2
    assert all(line == message or "closing signal SIGTERM" in line for line in lines), result.stderr
    assert not (tmp_path / "out").exists()


def test_the_makefile_launches_several_processes_through_the_quiet_launcher():
    result = subprocess.run(["make", "-n", "grpo", "NPROC=2", "MODEL=/nonexistent", "DATA=d.json", "IMAGES=i"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    launch = [line for line in result.stdout.splitlines() if "train_grpo.py" in line]
    assert len(launch) == 1 and "-m vlaa_min.infra.launch --standalone --nproc_per_node 2" in launch[0]


# ----------------------------------------------------------------------------------------------------------------
# A refused resume releases its lock


def test_a_refused_resume_releases_the_lock_so_the_next_run_takes_over_nothing(world, monkeypatch, capsys):
    flags = _sft_flags(world, "resumed")
    assert _cli(train_sft, flags, monkeypatch, capsys)[0] == 0
    config = (world / "resumed" / "config.json").read_text()
    code, _, stderr = _cli(train_sft, [*flags, "--resume", "true", "--lr", "3e-5"], monkeypatch, capsys)
    assert code == EXPECTED_ERROR and "Traceback" not in stderr
    assert _error_lines(stderr) == [f"error: cannot resume {world / 'resumed' / 'checkpoints' / 'step_000001'}: "
                                    f"settings that shape training differ from the run's:"]
    assert "  --lr 3e-05 (trained with 1e-05)" in stderr.splitlines()
    assert (world / "resumed" / ".lock").read_text() == ""  # released: no PID left behind
    assert (world / "resumed" / "config.json").read_text() == config
    code, stdout, _ = _cli(train_sft, [*flags, "--resume", "true"], monkeypatch, capsys)
    assert code == 0 and "taking over the lock" not in stdout


# ----------------------------------------------------------------------------------------------------------------
# SFT samples longer than --max-length: reported before step 1, skipped with --skip-bad, cut only with --truncate


@pytest.fixture(scope="module")
def long_sft(world):
    records = [_record(i) for i in range(8)]
    records[3] = _record(3, LONG_THOUGHT)  # line 4
    path = _write_jsonl(world / "long.jsonl", records)
    processor = Processor.from_pretrained(str(world / "init"))
    prompt, answer = processor.prompt_length(QUESTION, []), processor.target_length(records[3]["answer"])
    max_length = prompt + processor.target_length(records[0]["answer"])  # every sample fits, but line 4's
    assert prompt + answer > max_length
    return path, prompt, answer, max_length


def test_an_over_long_sft_sample_is_reported_with_its_token_counts(world, long_sft, monkeypatch, capsys):
    path, prompt, answer, max_length = long_sft
    code, _, stderr = _cli(train_sft, _sft_flags(world, "long", "long.jsonl", max_length), monkeypatch, capsys)
    assert code == EXPECTED_ERROR and "Traceback" not in stderr
    assert _error_lines(stderr) == [f"error: {path}:4 [id r3]: answer: the sample is {prompt + answer} tokens "
                                    f"(prompt {prompt}, image included, + answer {answer}), more than --max-length "
                                    f"{max_length}; raise it, or cut such answers with --truncate true"]
    assert not (world / "long").exists()


def test_skip_bad_skips_an_over_long_sft_sample_and_truncate_keeps_it_counted(world, long_sft, monkeypatch, capsys):
    path, _, _, max_length = long_sft
    flags = _sft_flags(world, "long-skipped", "long.jsonl", max_length)
    code, stdout, _ = _cli(train_sft, [*flags, "--skip-bad", "true"], monkeypatch, capsys)
    assert code == 0 and f"{path}: skipped 1 bad record(s) (too_long 1); kept 7" in stdout
    flags = _sft_flags(world, "long-cut", "long.jsonl", max_length)
    code, stdout, _ = _cli(train_sft, [*flags, "--truncate", "true"], monkeypatch, capsys)
    assert code == 0
    assert (f"{path}: 1 of 8 record(s) are longer than --max-length {max_length}; their answers are cut to fit "
            f"(--truncate true), e.g. {path}:4 [id r3]") in stdout
    assert json.loads((world / "long-cut" / "config.json").read_text())["truncate"] is True


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: a line that is not UTF-8 is dropped with its reason, the others go on


def _with_latin1_line(path: Path, records: list[dict], bad_line: int) -> None:
    """JSON lines, line `bad_line` (from 1) holding one latin-1 byte ("café" as 0x63 0x61 0x66 0xE9)."""
    lines = [json.dumps(record).encode() for record in records]
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"Which", b"caf\xe9: which")
    path.write_bytes(b"\n".join(lines) + b"\n")


def _dropped(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_metadata_step_drops_a_line_that_is_not_utf8_and_keeps_the_rest(world, tmp_path, capsys):
    source = tmp_path / "source.jsonl"
    _with_latin1_line(source, [{k: v for k, v in _record(i).items() if k != "answer"} for i in range(4)], 2)
    column = source.read_bytes().split(b"\n")[1].index(b"\xe9") + 1
    out = tmp_path / "meta.jsonl"
    assert pipeline_main(["metadata", "--in", str(source), "--out", str(out), "--images", str(world)]) == 0
    reason = f"{source}:2: encoding: not UTF-8 text: byte 0xe9 at column {column}"
    assert f"{reason}; dropped as source:2" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r2", "r3"]
    assert _dropped(tmp_path / "meta.dropped.jsonl") == [{"id": "source:2", "reason": "not_utf8", "detail": reason}]
    assert pipeline_main(["metadata", "--in", str(source), "--out", str(out), "--images", str(world)]) == 0
    assert len(_dropped(tmp_path / "meta.dropped.jsonl")) == 1  # a rerun drops it once


def test_a_later_step_drops_an_input_line_that_is_not_utf8(world, tmp_path):
    step_input = tmp_path / "5_verify.jsonl"
    _with_latin1_line(step_input, [_record(i) for i in range(3)], 3)
    stats = pipeline.step_split(step_input, tmp_path / "sft.jsonl", tmp_path / "rl.jsonl", world)
    assert stats["input"] == 3 and stats["kept"] == 2 and stats["dropped_by_reason"] == {"not_utf8": 1}
    dropped = _dropped(tmp_path / "sft.dropped.jsonl")
    assert [(d["id"], d["reason"]) for d in dropped] == [("5_verify:3", "not_utf8")]
    assert dropped[0]["detail"].startswith(f"{step_input}:3: encoding: not UTF-8 text: byte 0xe9")


def test_the_pipeline_command_line_ends_a_bad_file_in_one_line(tmp_path):
    source = tmp_path / "source.json"
    source.write_bytes(b'[{"id": "a", "question": "caf\xe9", "gt": "1"}]')  # one JSON value: cannot be skipped
    column = source.read_bytes().index(b"\xe9") + 1
    result = subprocess.run([sys.executable, "-m", "pipeline", "metadata", "--in", str(source), "--out",
                             str(tmp_path / "meta.jsonl"), "--images", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == EXPECTED_ERROR
    assert result.stderr.strip() == f"error: {source}:1: encoding: not UTF-8 text: byte 0xe9 at column {column}"
    assert not (tmp_path / "meta.jsonl").exists()
