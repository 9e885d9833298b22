"""torchrun / FSDP2: N ranks must train exactly like one process on the same global batch.

The multi-process tests spawn 2 gloo processes on the CPU (torch.multiprocessing) and run the real trainers; the
one-process runs are the references. The GRPO step (which covers sharded forward/backward, gathered rollouts, the
sharded reference and every reduction) is in the default suite; the SFT step, checkpoint/resume and Qwen3-VL's
DeepStack under FSDP2 (one sharded forward/backward with images) are `slow`. fp32 everywhere: the only
difference left is the order in which float sums are taken (a gradient reduced over 2 ranks adds 2 partial sums
instead of one running sum), so the tolerances below are a few ulps of fp32 scaled by the number of terms, not
fitted to a run.
"""

import json
import os
import random
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

import data
import train_grpo
import train_sft
from vlaa_min.config import ModelConfig
from vlaa_min.generate import Rollout
from vlaa_min.infra import distributed
from vlaa_min.infra.cli import ConfigError, UserError
from vlaa_min.logprobs import completion_logprobs
from vlaa_min.metrics import read_metrics
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor
from vlaa_min.toy_model import build_toy_checkpoint


def test_sampler_shares_are_disjoint_cover_the_batch_and_resume_exactly():
    num_items, world, batch = 23, 3, 6  # batches cross epoch boundaries
    alone = data.EpochSampler(num_items, seed=5)
    ranks = [data.EpochSampler(num_items, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(10):
        shares = [sampler.next_batch(batch) for sampler in ranks]
        assert all(len(share) == batch // world for share in shares)
        assert sum(shares, []) == alone.next_batch(batch)  # together: the one-process batch, in order
    # disjoint and covering: over one epoch, every record comes exactly once across the ranks
    fresh = [data.EpochSampler(12, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = sum((s.next_batch(4) for _ in range(3) for s in fresh), [])
    assert sorted(seen) == list(range(12))
    # resume: a sampler restored from rank 1's state continues rank 1's shares
    restored = data.EpochSampler(num_items, seed=5, rank=1, world_size=world)
    restored.load_state_dict(ranks[1].state_dict())
    assert [restored.next_batch(batch) for _ in range(5)] == [ranks[1].next_batch(batch) for _ in range(5)]


def test_sampler_refuses_a_batch_that_does_not_split_over_the_ranks():
    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        data.EpochSampler(10, seed=0, rank=0, world_size=4).next_batch(6)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        data.EpochSampler(10, seed=0, rank=2, world_size=2)


# --------------------------------------------------------------------------- two gloo processes vs one


def _run_ranks(world: int, target, *args) -> None:
    """Run target(*args) in `world` spawned processes joined by gloo (what torchrun sets up: the env variables)."""
    port = _free_port()
    mp.start_processes(_rank_main, args=(world, port, target, args), nprocs=world, start_method="spawn", join=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, target, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        target(*args)
    finally:
        distributed.shutdown()


TINY = dict(text_num_hidden_layers=2, text_hidden_size=64, text_intermediate_size=128, text_num_attention_heads=2,
            text_num_key_value_heads=1, text_mrope_section=[4, 6, 6], vision_depth=2, vision_out_hidden_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Multiple-choice records whose questions differ (so a completion can only belong to its own prompt)."""
    root = tmp_path_factory.mktemp("distributed")
    rng = random.Random(0)
    records = []
    for i in range(32):
        options = rng.sample(range(100), 4)
        question = f"Which number is {options[2]}?\n" + "\n".join(f"{l}. {o}" for l, o in zip("ABCD", options))
        letter = rng.choice("ABCD")
        records.append({"id": f"q{i}", "question": question, "gt": "C", "verifier_type": "mcq",
                        "answer": f"<think>It is {letter}.</think> <answer>{letter}</answer>"})
    (root / "records.json").write_text(json.dumps(records))
    build_toy_checkpoint(str(root / "init"), str(root), vocab_size=300, seed=0, **TINY)
    return root


def _weights(path) -> dict[str, torch.Tensor]:
    return VLModel.from_pretrained(path).state_dict()


def _assert_same_update(init, one, two, lr: float, steps: int = 1) -> None:
    """Weights after `steps` AdamW steps from one process and from two.

    AdamW's first step moves each weight by lr * g / (|g| + eps) (eps = 1e-8): a gradient much larger than eps
    moves it by lr in the gradient's sign, whatever the gradient's last bits. Later steps are smooth functions of
    the gradients, whose relative difference is the fp32 summation-order error, at most n * 2^-24 for sums of n
    terms: below 1e-3 for n up to 10^4. So weights that moved by more than lr / 2 agree within steps * lr * 1e-3
    plus a few ulps. Only weights whose gradient is within a few eps of 0 may see the summation order and move
    anywhere in [-lr, lr] per step; they must be few. So are the key biases: a bias on the keys adds the same
    q.b to every logit of a query, which softmax ignores, so their gradient is 0 up to rounding noise that Adam
    blows up to a full step. (Weights without a gradient, the vision tower on these image-free records, do not
    move in either run.)
    """
    w0, w1, w2 = _weights(init), _weights(one), _weights(two)
    sure = total = 0
    for name in w0:
        moved = (w1[name] - w0[name]).abs()
        confident = (moved > lr / 2) & (not name.endswith("k_proj.bias"))
        tight = steps * lr * 1e-3 + 4 * torch.finfo(torch.float32).eps * (w1[name].abs() + lr)
        bound = torch.where(confident, tight, torch.full_like(tight, 2 * steps * lr))
        assert ((w1[name] - w2[name]).abs() <= bound).all(), name
        sure, total = sure + int(confident.sum()), total + int((moved > 0).sum())
    assert sure > 0.5 * total  # the tight comparison covers most of the weights that moved


def _sft(root, out, **overrides):
    settings = dict(model=str(root / "init"), data=str(root / "records.json"), images=str(root), out=str(root / out),
                    steps=1, batch_size=8, micro_batch_size=4, lr=1e-3, warmup_ratio=0.0, eval_size=8,
                    eval_every=0, freeze_vision=False, device="cpu", overwrite=True)
    return train_sft.SFTConfig(**(settings | overrides))


@pytest.mark.slow  # spawns 2 + 1 (SFT) or 2 x 2 (resume) trainer processes: a minute on 2 cores
def test_one_sft_step_on_two_ranks_is_one_process_step(world):
    train_sft.main(_sft(world, "sft-1"))
    _run_ranks(2, train_sft.main, _sft(world, "sft-2"))
    loss_1, loss_2 = (read_metrics(world / out / "metrics.jsonl")[0]["loss"] for out in ("sft-1", "sft-2"))
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)  # one fp32 sum over ~10^2 tokens taken in another order
    _assert_same_update(world / "init", world / "sft-1" / "model", world / "sft-2" / "model", lr=1e-3)


def _fixed_rollouts_then(main, cfg) -> None:
    """Run `main(cfg)` with the engine's sampling replaced by completions fixed by each prompt's own tokens.

    Sampling draws from one generator per rank, so 2 ranks cannot draw what one process draws; fixing the
    completions per prompt (and scoring their pi_old log-probs under the policy, as the engine would) makes both
    runs train on the same rollout wherever its prompts are sampled.
    """
    processor = Processor.from_pretrained(cfg.model)
    stop = processor.stop_token_ids[0]

    @torch.no_grad()
    def generate(self, batch, num_samples, params, generator):
        rows = []
        for ids, valid in zip(batch.input_ids, batch.attention_mask):
            seed = int((ids[valid] * torch.arange(int(valid.sum()))).sum())  # the prompt's identity
            rng = random.Random(seed)
            for _ in range(num_samples):
                text = f"<think>{rng.choice(['so', 'it is'])}</think> <answer>{rng.choice('ABCD')}</answer>"
                rows.append(processor.tokenizer.encode(text, add_special_tokens=False)[: params.max_new_tokens - 1])
        lengths = torch.tensor([len(r) + 1 for r in rows])
        ids = torch.full((len(rows), int(lengths.max())), processor.special_ids["pad_token_id"])
        for i, r in enumerate(rows):
            ids[i, : len(r) + 1] = torch.tensor(r + [stop])
        prompt_index = torch.arange(len(batch.input_ids)).repeat_interleave(num_samples)
        logp, _ = completion_logprobs(self.model, batch, ids, lengths, params.temperature, prompt_rows=prompt_index)
        return Rollout(ids, lengths, torch.ones(len(rows), dtype=torch.bool), ["stop"] * len(rows), logp.float(),
                       prompt_index)

    original, train_grpo.Engine.generate = train_grpo.Engine.generate, generate
    try:
        main(cfg)
    finally:
        train_grpo.Engine.generate = original  # the one-process run shares the test session's Engine


def _grpo(root, out, **overrides):
    settings = dict(model=str(root / "init"), data=str(root / "records.json"), images=str(root), eval_data=None,
                    out=str(root / out), steps=1, prompts_per_step=4, group_size=4, max_new_tokens=24,
                    train_batch_size=16, micro_batch_size=4, mu=2, lr=1e-3, warmup_ratio=0.0, kl_init=0.05,
                    kl_target=0.01, save_every=0, sample_every=0, device="cpu", overwrite=True)
    return train_grpo.GRPOConfig(**(settings | overrides))


def test_one_grpo_step_on_two_ranks_is_one_process_step(world):
    """beta > 0 (a sharded reference) and mu = 2: two updates from the same rollout, the second off-policy.
    The held-out eval before and after is split over the ranks (2 and 3 records: uneven numbers of batches). The
    two ranks generate their prompts one engine call each (--rollout-batch-size 1), the one process all at once."""
    held_out = dict(eval_data=str(world / "records.json"), eval_size=5, eval_batch_size=1, log_rollouts_every=1)
    _fixed_rollouts_then(train_grpo.main, _grpo(world, "grpo-1", **held_out))
    _run_ranks(2, _fixed_rollouts_then, train_grpo.main, _grpo(world, "grpo-2", rollout_batch_size=1, **held_out))
    evals = [json.loads((world / out / "eval.json").read_text()) for out in ("grpo-1", "grpo-2")]
    assert evals[0] == evals[1] and evals[0]["before"]["n"] == 5
    answers = [[entry for entry in map(json.loads, open(world / out / "rollouts.jsonl")) if entry["kind"] == "eval"]
               for out in ("grpo-1", "grpo-2")]
    assert len(answers[0]) == 2 and answers[0] == answers[1]  # before and after: each record with its own answer
    one, two = (read_metrics(world / out / "metrics.jsonl")[0] for out in ("grpo-1", "grpo-2"))
    for key in ("reward", "accuracy", "completion_length", "frac_reward_zero_std"):
        assert two[key] == one[key], key  # the same rollout, gathered from both ranks
    for key in ("loss", "kl", "beta", "entropy", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-9), key
    _assert_same_update(world / "init", world / "grpo-1" / "model", world / "grpo-2" / "model", lr=1e-3, steps=2)


def _grpo_run(root, out, **overrides):
    """Real sampling (each rank's own generator), two steps, a checkpoint after each."""
    return _grpo(root, out, steps=2, save_every=1, mu=1, train_batch_size=8, **overrides)


@pytest.mark.slow  # spawns 2 + 1 (SFT) or 2 x 2 (resume) trainer processes: a minute on 2 cores
def test_a_two_rank_checkpoint_loads_anywhere_and_resumes_exactly_under_two_ranks(world):
    from transformers import AutoModelForImageTextToText

    out = world / "grpo-resume"
    _run_ranks(2, train_grpo.main, _grpo_run(world, "grpo-resume"))
    shutil.copytree(out / "model", world / "grpo-straight")
    # the checkpoint of step 1 is one HF directory: our loader and transformers read the same weights
    step_1 = out / "checkpoints" / "step_000001"
    ours = VLModel.from_pretrained(step_1).eval()
    theirs = AutoModelForImageTextToText.from_pretrained(step_1).eval()
    processor = Processor.from_pretrained(step_1)
    batch = processor.collate_prompts([processor.encode_prompt("Which number is 3?", [])])
    with torch.no_grad():
        expected = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        got = ours(batch.input_ids, batch.position_ids, batch.attention_mask)
    assert torch.allclose(got, expected, atol=1e-4)
    # as if the run died after step 1: resumed under 2 ranks it ends on the very same weights
    shutil.rmtree(out / "checkpoints" / "step_000002")
    shutil.rmtree(out / "model")
    _run_ranks(2, train_grpo.main, _grpo_run(world, "grpo-resume", resume=True, overwrite=False))
    straight, resumed = _weights(world / "grpo-straight"), _weights(out / "model")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    # one process cannot continue what two started
    with pytest.raises(UserError, match=r"written by 2 process\(es\); resume it with the same number"):
        train_grpo.main(_grpo_run(world, "grpo-resume", resume=True, overwrite=False))


def test_too_many_processes_for_the_prompts_or_groups_is_refused():
    def check(world, **sizes):
        train_grpo.check_world_size(train_grpo.GRPOConfig(**(dict(micro_batch_size=4) | sizes)), world)

    with pytest.raises(ConfigError, match=r"8 processes \(NPROC\) are more than the --prompts-per-step 4"):
        check(8, prompts_per_step=4, group_size=4, train_batch_size=16)
    with pytest.raises(ConfigError, match="--prompts-per-step 6 must be a multiple of the 4 processes"):
        check(4, prompts_per_step=6, group_size=4, train_batch_size=8)
    with pytest.raises(ConfigError, match="must split into whole groups of --group-size 4 on each of the 2"):
        check(2, prompts_per_step=4, group_size=4, train_batch_size=4)
    check(2, prompts_per_step=4, group_size=4, train_batch_size=8)  # 1 group per rank per update: fine


@pytest.mark.slow
def test_the_memory_bench_runs_on_the_cpu_for_one_and_two_ranks():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "memory.py"
    flags = "--size 3b --layers 1 --vision-depth 1 --vocab-size 1024 --ranks 2 --prompts 2 --group-size 2 " \
            "--new-tokens 4 --prompt-length 48 --sft-length 64 --image-size 56 --sft-micro 2 --grpo-micro 2 " \
            "--update-micro-batches 1"
    out = subprocess.run([sys.executable, str(bench), *flags.split()], capture_output=True, text=True, check=True)
    rows = [line.split("|")[2:-1] for line in out.stdout.splitlines() if line.startswith("| |")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("1", "off"), ("1", "on"), ("2", "off"), ("2", "on")]
    for row in rows:
        assert all(float(cell) > 0 for cell in row[2:]), row  # every phase ran (no OOM) and was measured


def _deepstack_gradients(rank_count: int, out) -> None:
    """One forward/backward of the tiny Qwen3-VL (DeepStack, images in a left-padded batch, gradient checkpointing)
    under `distributed.shard`; every rank runs the same batch, so the summed gradients are rank_count times one
    process's. Rank 0 writes the loss and the full gradients to `out`."""
    from tests.helpers import randomize_
    from tests.test_qwen3_vl import make_case, our_positions

    device = distributed.setup("cpu")
    model = VLModel(ModelConfig.tiny("qwen3_vl", text_num_hidden_layers=2))
    randomize_(model, seed=4)
    model.train().gradient_checkpointing = True
    distributed.shard(model, device)
    input_ids, mask, pixels, grid = make_case("left_padded_images_and_text")
    loss = model(input_ids, our_positions(input_ids, mask, grid), mask, pixels, grid).logsumexp(-1)[mask].mean()
    loss.backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) / rank_count
             for name, p in model.named_parameters()}
    if distributed.is_main():
        torch.save({"loss": loss.detach(), "grads": grads}, out)


@pytest.mark.slow  # spawns 2 processes for one forward/backward: 58 s on a busy 2-core machine
def test_qwen3_vl_deepstack_under_fsdp2_gives_one_process_gradients(tmp_path):
    _deepstack_gradients(1, tmp_path / "one.pt")
    _run_ranks(2, _deepstack_gradients, 2, tmp_path / "two.pt")
    one, two = (torch.load(tmp_path / name) for name in ("one.pt", "two.pt"))
    torch.testing.assert_close(two["loss"], one["loss"])
    assert one["grads"].keys() == two["grads"].keys()
    assert one["grads"]["visual.deepstack_merger_list.1.linear_fc2.weight"].abs().sum() > 0
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
