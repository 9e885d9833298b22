"""The rollout log of a real (tiny) GRPO run, its resume, and the viewer page: parsed, and loaded in Chromium.

The browser check runs the page's own #selftest (it moves the step slider, compares the cards before and after,
toggles the first-vs-last view) under headless Chromium and fails on any console message; it skips when no
Chromium is installed (.ci/run installs Debian's package).
"""

import dataclasses
import json
import os
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
    assert [(e["kind"], e["step"]) for e in entries] == [("eval", 0), ("train", 2), ("train", 4), ("eval", 4)]
    for entry in entries:
        if entry["kind"] == "eval":
            assert [g["id"] for g in entry["groups"]] == ["r100", "r101", "r102", "r103"]  # <= groups x 4 answers
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
    used = {g["image"] for e in logged for g in e["groups"]}
    assert set(data["images"]) == used and all(uri.startswith("data:image/jpeg;base64,") for uri in data["images"].values())
    assert page.links == []  # nothing loaded from anywhere: no src / href at all
    with pytest.raises(SystemExit):
        view.main([str(tmp_path)])  # no rollouts.jsonl there


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_page_works_in_headless_chromium(run, tmp_path):
    out = view.main([run.out, "--out", str(tmp_path / "page.html")])
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", Path(out).resolve().as_uri() + "#selftest"],
        capture_output=True, text=True, timeout=120)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert '<pre id="selftest">selftest: ok steps=2 cards=8,8 compared=' in result.stdout
