"""The rollout log of a real (tiny) GRPO run, its resume, and the viewer page: parsed, and loaded in Chromium.

The browser check runs the page's own #selftest (it moves the step slider, compares the cards before and after,
toggles the first-vs-last view, which must show the first and last step's numbers, not the slider's, and counts
the chart's held-out points) under headless Chromium and fails on any console message; it skips when no Chromium
is installed (.ci/run installs Debian's package).
"""

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import train_grpo
from vlaa_min import view
from vlaa_min.metrics import read_metrics
from vlaa_min.toy_model import build_toy_checkpoint

TINY = dict(text_num_hidden_layers=1, text_hidden_size=64, text_intermediate_size=128, text_num_attention_heads=2,
            text_num_key_value_heads=1, text_mrope_section=[4, 6, 6], vision_depth=1, vision_out_hidden_size=64)


def _records(n: int, offset: int) -> list[dict]:
    return [{"id": f"r{offset + i}", "image": f"img{(offset + i) % 5}.png", "question": f"How many dots? ({i})",
             "gt": str(i % 4), "verifier_type": "digit"} for i in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step GRPO run from a random tiny model, logging 2 groups every 2 steps, with a KL reference."""
    root = tmp_path_factory.mktemp("view")
    (root / "images").mkdir()
    for k in range(5):
        Image.new("RGB", (56, 56), (40 * k, 200 - 30 * k, 90)).save(root / "images" / f"img{k}.png")
    (root / "rl.json").write_text(json.dumps(_records(16, 0)))
    (root / "test.json").write_text(json.dumps(_records(4, 100)))
    build_toy_checkpoint(str(root / "init"), str(root), vocab_size=300, seed=0, **TINY)
    config = train_grpo.GRPOConfig(
        model=str(root / "init"), data=str(root / "rl.json"), images=str(root / "images"),
        eval_data=str(root / "test.json"), eval_size=0, out=str(root / "grpo"), steps=4, prompts_per_step=4,
        group_size=4, max_new_tokens=12, train_batch_size=16, micro_batch_size=16, lr=1e-3, kl_init=1e-2,
        kl_target=0.0, save_every=2, sample_every=0, eval_batch_size=4, log_rollouts_every=2,
        rollout_groups_per_log=2, device="cpu")
    train_grpo.main(config)
    return config


def test_grpo_writes_the_rollout_log(run):
    entries = read_metrics(os.path.join(run.out, "rollouts.jsonl"))
    assert [(e["kind"], e["step"]) for e in entries] == [("eval", 0), ("probe", 0), ("train", 2), ("probe", 2),
                                                           ("train", 4), ("probe", 4), ("eval", 4)]
    # The probes: the first `groups` held-out questions answered wrong before training, G samples each.
    wrong_before = [g["id"] for g in entries[0]["groups"] if not g["completions"][0]["correct"]]
    assert wrong_before, "a random init should get some of the held-out questions wrong"
    for entry in entries:
        if entry["kind"] == "eval":
            assert [g["id"] for g in entry["groups"]] == ["r100", "r101", "r102", "r103"]  # <= groups x 4 answers
            continue
        if entry["kind"] == "probe":
            assert [g["id"] for g in entry["groups"]] == wrong_before[:2]
            assert all(len(g["completions"]) == run.group_size for g in entry["groups"])
            continue
        assert entry["kl_to"] == "reference" and len(entry["groups"]) == 2
        for group in entry["groups"]:
            assert len(group["completions"]) == run.group_size
            rewards = [c["reward"] for c in group["completions"]]
            assert group["no_signal"] == (max(rewards) == min(rewards))
            for c in group["completions"]:
                assert 1 <= c["length"] <= run.max_new_tokens
                assert c["length"] == len(c["tokens"]) == len(c["logp"]) == len(c["ratio"]) == len(c["kl"])
                assert all(k >= 0 for k in c["kl"])  # k3 >= 0


def test_a_resumed_run_logs_each_step_once(run):
    """Cut the run back to its step-2 checkpoint, resume it: the log ends as the uninterrupted run's did (exact
    resume on CPU), with no step twice and none lost."""
    out = Path(run.out)
    straight = (out / "rollouts.jsonl").read_text()
    for later in sorted((out / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    shutil.rmtree(out / "model")
    train_grpo.main(dataclasses.replace(run, resume=True))
    assert (out / "rollouts.jsonl").read_text() == straight


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.data, self.links, self._in_data = "", [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        self._in_data = tag == "script" and attrs.get("id") == "data"

    def handle_endtag(self, tag):
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data += data


def test_the_page_parses_and_holds_the_logged_groups(run, tmp_path):
    out = view.main([run.out, "--out", str(tmp_path / "page.html")])
    page = _Page()
    page.feed(Path(out).read_text())
    page.close()
    data = json.loads(page.data)
    logged = read_metrics(os.path.join(run.out, "rollouts.jsonl"))
    assert [[g["id"] for g in e["groups"]] for e in data["entries"]] == [[g["id"] for g in e["groups"]] for e in logged]
    assert [row["step"] for row in data["metrics"]] == [1, 2, 3, 4]
    history = json.loads((Path(run.out) / "eval.json").read_text())  # held-out accuracy before and after GRPO
    assert data["heldout"] == [{"step": 0, "accuracy": history["before"]["accuracy"]},
                               {"step": run.steps, "accuracy": history["after"]["accuracy"]}]
    used = {g["image"] for e in logged for g in e["groups"]}
    assert set(data["images"]) == used  # one thumbnail per image, however many groups show it
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in data["images"].values())
    assert page.links == []  # nothing loaded from anywhere: no src / href at all
    with pytest.raises(SystemExit):
        view.main([str(tmp_path)])  # no rollouts.jsonl there


def test_the_page_skips_a_corrupt_line_with_a_warning(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run.out, copy)
    logged = read_metrics(str(copy / "rollouts.jsonl"))
    for name in ("rollouts.jsonl", "metrics.jsonl"):  # the second line of each becomes garbage
        lines = (copy / name).read_text().splitlines(keepends=True)
        (copy / name).write_text("".join([lines[0], '{"step": 2, "gro\n', *lines[2:]]))
    data = view.page_data(str(copy))
    kept = logged[:1] + logged[2:]
    assert [(e["kind"], e["step"]) for e in data["entries"]] == [(e["kind"], e["step"]) for e in kept]
    assert [row["step"] for row in data["metrics"]] == [1, 3, 4]
    printed = capsys.readouterr().out
    assert f"warning: {copy / 'rollouts.jsonl'}:2: not a JSON object; skipped" in printed
    assert f"warning: {copy / 'metrics.jsonl'}:2: not a JSON object; skipped" in printed


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def _selftest_in_chromium(page: str, tmp_path) -> str:
    """Load page#selftest in headless Chromium; returns the self-test's line, after checking the console is quiet."""
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", Path(page).resolve().as_uri() + "#selftest"],
        capture_output=True, text=True, timeout=300)
    assert [line for line in result.stderr.splitlines() if ":CONSOLE" in line] == []
    match = re.search(r'<pre id="selftest">(selftest: [^<]*)</pre>', result.stdout)
    assert match, "the page's self-test did not run"
    return match.group(1)


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")


@needs_chromium
def test_the_page_works_in_headless_chromium(run, tmp_path):
    out = view.main([run.out, "--out", str(tmp_path / "page.html")])
    # The slider's first position is step 0, the probes before training (2 x G = 8 cards); its last, step 4: two
    # training groups and the two probes (16).
    assert _selftest_in_chromium(out, tmp_path).startswith("selftest: ok steps=2 cards=8,16 compared=6 heldout=2 ")


@pytest.mark.slow
@needs_chromium
def test_the_page_stays_quick_with_thousands_of_completions(tmp_path):
    """A real run's scale: 60 logged steps x 4 groups x G = 8 = 1,920 completions of 512 tokens each."""
    rng = random.Random(0)
    words = ["<think>", " the", " red", " circle", " wait", ",", " 三", "🤔", " count", " is", "</think>", " 3"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "rollouts.jsonl", "w") as f:
        for step in range(1, 61):
            groups = []
            for p in range(4):
                completions = []
                for g in range(8):
                    tokens = [rng.choice(words) for _ in range(512)]
                    completions.append({
                        "text": "".join(tokens), "reward": float(g % 2), "reason": "ok" if g % 2 else "wrong",
                        "correct": bool(g % 2), "advantage": (g % 2 - 0.5) * 2, "length": 512, "truncated": True,
                        "tokens": tokens, "logp": [round(-rng.random(), 3) for _ in tokens],
                        "ratio": [round(1 + rng.gauss(0, 0.05), 4) for _ in tokens],
                        "kl": [round(rng.random() * 1e-3, 5) for _ in tokens]})
                groups.append({"id": f"q{step % 7}-{p}", "question": "How many red circles? " * 20, "gt": "3",
                               "type": "digit", "image": None, "no_signal": False, "completions": completions})
            f.write(json.dumps({"step": step, "kind": "train", "kl_to": "reference", "groups": groups}) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": s / 60, "accuracy": s / 70})
                                                   + "\n" for s in range(1, 61)))
    line = _selftest_in_chromium(view.main([str(run_dir)]), tmp_path)
    assert line.startswith("selftest: ok steps=60 cards=32,32 compared=")
    timings = dict(item.split("=") for item in line.split()[2:])
    assert int(timings["move_ms"]) < 2000  # one step's 32 cards of 512 tokens
