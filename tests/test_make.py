"""The Makefile as a user meets it: plain `make` lists every target, `make grpo` runs the control after GRPO
unless CONTROL=0, and `make eval` scores the same held-out questions as make grpo. Dry runs (`make -n`) only."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> str:
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _command(output: str, script: str) -> list[str]:
    """The words of the one command line of `make -n` that runs `script` ([] when there is none)."""
    lines = [line for line in output.replace("\\\n", " ").splitlines() if script in line]
    assert len(lines) <= 1, lines
    return shlex.split(lines[0]) if lines else []


def _flag(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_plain_make_lists_every_target():
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    shown = make()
    listed = {line.split()[0] for line in shown.splitlines() if line.startswith("  ") and line.strip()}
    assert set(phony) - {"help"} <= listed
    for variable in ("MODEL", "DATA", "IMAGES", "NPROC", "ARGS", "CONTROL", "RUN", "TRACES"):
        assert f"{variable}=" in shown, variable


@pytest.mark.parametrize("control", ["1", "0"])
def test_make_grpo_passes_args_on_and_runs_the_control_unless_control_0(control):
    output = make("-n", "grpo", "ARGS=--steps 5", f"CONTROL={control}")
    grpo = _command(output, "train_grpo.py")
    assert _flag(grpo, "--steps") == "5"
    if control == "0":
        assert _command(output, "control.py") == []
    else:  # after GRPO, on its run folder (control.py sizes itself from that run's saved config)
        assert _flag(_command(output, "control.py"), "--grpo") == _flag(grpo, "--out")
        assert output.index("control.py") > output.index("train_grpo.py")


def test_make_eval_scores_the_questions_make_grpo_holds_out():
    grpo, evaluation = _command(make("-n", "grpo"), "train_grpo.py"), _command(make("-n", "eval"), "evaluate.py")
    assert _flag(evaluation, "--data") == _flag(grpo, "--eval-data")
    assert _flag(evaluation, "--eval-size") == _flag(grpo, "--eval-size")
