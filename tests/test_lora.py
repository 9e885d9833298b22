"""LoRA (vlaa_min/lora.py) and the trainers with --lora-rank: what trains, what the model computes at step 0, merge,
the reference with adapters off, checkpoints in PEFT's format, exact resume, two gloo ranks, and PEFT itself
loading our adapters onto transformers' Qwen2.5-VL (and ours loading PEFT's). Tiny random models in fp32 on CPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_grpo
import train_sft
from tests.helpers import randomize_
from tests.test_distributed import TINY, _fixed_rollouts_then, world  # noqa: F401 (world: a fixture)
from tests.test_model import HF_CLASSES, hf_logits, make_case, our_logits, our_positions
from vlaa_min import lora
from vlaa_min.config import ModelConfig
from vlaa_min.infra.cli import ConfigError
from vlaa_min.infra.runtime import seed_everything
from vlaa_min.metrics import read_metrics
from vlaa_min.model import VLModel
from vlaa_min.processor import Processor

ROOT = Path(__file__).resolve().parents[1]
CASE = "left_padded_with_images"


def tiny_model(seed: int = 0) -> VLModel:
    model = VLModel(ModelConfig.tiny("qwen2_5_vl")).eval()
    randomize_(model, seed=seed)
    return model


def randomize_adapters_(model, seed: int) -> None:
    """B = 0 makes every adapter a no-op; random B (and A) make them count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def adapted(seed: int = 0, rank: int = 4, **kwargs) -> tuple[VLModel, VLModel]:
    """(the base, a copy of it with LoRA on the default targets)."""
    base, model = tiny_model(seed), tiny_model(seed)
    lora.apply_lora(model, rank, alpha=2.0 * rank, dropout=0.0, targets=lora.DEFAULT_TARGETS, **kwargs)
    return base, model


def logits(model, case: str = CASE) -> torch.Tensor:
    input_ids, mask, pixels, grid = make_case(case)
    return our_logits(model, input_ids, mask, pixels, grid)[mask]  # (real tokens, V)


# --------------------------------------------------------------------------- the layer


def test_only_the_adapters_are_trainable_and_get_gradients():
    base, model = adapted()
    names = lora.apply_lora(tiny_model(), 4, 8.0, 0.0, "q_proj,v_proj")
    layers = model.config.text.num_hidden_layers
    assert len(names) == 2 * layers and all(n.startswith("language_model.layers.") for n in names)
    assert len(lora.lora_layers(model)) == 7 * layers  # the vision tower's gate/up/down are never adapted
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.lora_{ab}.weight" for layer in lora.lora_layers(model) for ab in "AB"}
    model.train()
    input_ids, mask, pixels, grid = make_case(CASE)
    randomize_adapters_(model, seed=1)  # at B = 0, A's gradient is 0
    model(input_ids, our_positions(input_ids, mask, grid), mask, pixels, grid)[mask].logsumexp(-1).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable and all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)


def test_at_step_0_the_adapted_model_is_the_base_and_adapters_off_is_the_base_exactly():
    base, model = adapted()
    assert torch.equal(logits(model), logits(base))  # B = 0
    randomize_adapters_(model, seed=1)
    assert (logits(model) - logits(base)).abs().max() > 1e-2  # the adapters now count
    with lora.adapters_off(model):
        assert torch.equal(logits(model), logits(base))
    assert not torch.equal(logits(model), logits(base))  # back on after the block


def test_merged_equals_unmerged_and_the_base_weights_come_back_bit_for_bit():
    _, model = adapted()
    randomize_adapters_(model, seed=2)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    unmerged = logits(model)
    # fp32 rounding of W + (alpha / r) B A against W x + (alpha / r) B (A x): 1e-5 relative to the logits' size
    # (multi-threaded matmuls sum in another order, so an absolute 1e-5 on logits near 2 is too tight).
    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    with lora.merged(model):
        close(logits(model), unmerged)
        assert not torch.equal(model.state_dict()["language_model.layers.0.mlp.up_proj.weight"],
                               before["language_model.layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    folded = lora.fold_(model)
    assert not lora.lora_layers(folded)
    close(logits(folded), unmerged)


def test_a_target_that_matches_no_layer_is_an_error_before_any_weight_loads(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path / "base")
    assert lora.check_targets(tmp_path / "base", "q_proj, down_proj") == ["q_proj", "down_proj"]
    with pytest.raises(ConfigError, match="qkv matches no linear layer of .*decoder \\(it has: down_proj,gate_proj"):
        lora.check_targets(tmp_path / "base", "q_proj,qkv")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(VLModel, "from_pretrained", no_loading)
    with pytest.raises(ConfigError, match="--lora-targets q_proj,fc1: fc1 matches no"):
        train_sft.main(train_sft.SFTConfig(model=str(tmp_path / "base"), out=str(tmp_path / "out"), lora_rank=4,
                                           lora_targets="q_proj,fc1", device="cpu"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--freeze-vision false needs full fine-tuning"):
        train_sft.SFTConfig(lora_rank=4, freeze_vision=False)
    with pytest.raises(ConfigError, match="--lora-rollout must be one of merged\\|adapters"):
        train_grpo.GRPOConfig(lora_rank=4, lora_rollout="fused")


# --------------------------------------------------------------------------- PEFT's format, and PEFT itself


def test_our_adapter_in_peft_on_transformers_gives_our_logits_and_peft_s_adapter_loads_in_ours(tmp_path):
    peft = pytest.importorskip("peft")
    base, model = adapted(base="unused")
    randomize_adapters_(model, seed=3)
    base.save_pretrained(tmp_path / "base")
    lora.save_adapter(tmp_path / "ours", model)
    saved = load_file(tmp_path / "ours" / lora.WEIGHTS_FILE)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    input_ids, mask, pixels, grid = make_case(CASE)
    hf = HF_CLASSES["qwen2_5_vl"].from_pretrained(tmp_path / "base", attn_implementation="sdpa").eval()
    with_ours = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    theirs = hf_logits(with_ours.base_model.model, input_ids, mask, pixels, grid)[mask]
    assert (theirs - logits(model)).abs().max() <= 1e-4  # transformers vs ours, as in test_model.py

    hf = HF_CLASSES["qwen2_5_vl"].from_pretrained(tmp_path / "base", attn_implementation="sdpa")
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=r".*language_model.*\.(k_proj|down_proj)")
    peft_model = peft.get_peft_model(hf, config)
    randomize_adapters_(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = hf_logits(peft_model.eval().base_model.model, input_ids, mask, pixels, grid)[mask]
    ours = lora.load_lora_model(tmp_path / "peft", base=str(tmp_path / "base")).eval()
    assert ours.lora.targets == ["down_proj", "k_proj"] and ours.lora.alpha / ours.lora.rank == 1.5
    assert (logits(ours) - expected).abs().max() <= 1e-4


# --------------------------------------------------------------------------- the trainers


def _grpo(root, out, **overrides) -> train_grpo.GRPOConfig:
    settings = dict(model=str(root / "init"), data=str(root / "records.json"), images=str(root), eval_data=None,
                    out=str(root / out), steps=3, prompts_per_step=2, group_size=2, max_new_tokens=24,
                    train_batch_size=4, micro_batch_size=2, lr=1e-2, save_every=1, sample_every=0, device="cpu",
                    log_rollouts_every=0, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, kl_init=0.05)
    return train_grpo.GRPOConfig(**(settings | overrides))


def _adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(f"{directory}/{lora.WEIGHTS_FILE}")


def test_a_lora_grpo_run_saves_only_adapters_starts_at_kl_0_and_resumes_bit_identically(world, capsys):
    out = world / "grpo"
    _fixed_rollouts_then(train_grpo.main, _grpo(world, "grpo"))  # answers that differ: rewards that differ
    printed = capsys.readouterr().out
    assert "trainable parameters of" in printed and "rollouts: adapters merged" in printed
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["kl"] == 0.0  # one update per step: the policy at B = 0 is the reference, the base
    assert (out / "model" / lora.CONFIG_FILE).exists() and not (out / "model" / "model.safetensors").exists()
    config = json.loads((out / "model" / lora.CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(world / "init")
    straight = _adapter(out / "model")
    init = VLModel.from_pretrained(world / "init").state_dict()
    moved = [n for n, t in straight.items() if "lora_B" in n and t.abs().sum() > 0]
    assert moved  # the adapters trained
    # the base model's weights never moved: the folded model minus each adapter's B A is the base
    policy = lora.load_lora_model(out / "model")
    assert all(torch.equal(t, init[name]) for name, t in policy.state_dict().items() if ".lora_" not in name)
    # killed after step 2: the resumed run ends on the very same adapters
    shutil.rmtree(out / "checkpoints" / "step_000003")
    shutil.rmtree(out / "model")
    _fixed_rollouts_then(train_grpo.main, _grpo(world, "grpo", resume=True))
    resumed = _adapter(out / "model")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_lora_sft_trains_the_adapters_and_merge_writes_a_full_checkpoint(world, capsys):
    out = world / "sft"
    cfg = dict(model=str(world / "init"), data=str(world / "records.json"), images=str(world), out=str(out), steps=2,
               batch_size=4, micro_batch_size=2, lr=1e-2, eval_size=4, eval_every=0, max_length=1024, device="cpu",
               lora_rank=2, lora_targets="v_proj,up_proj")
    train_sft.main(train_sft.SFTConfig(**cfg))
    layers = TINY["text_num_hidden_layers"]
    assert f"LoRA r=2 alpha=32 dropout=0 on {2 * layers} linears (v_proj,up_proj)" in capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[1]["loss"] < rows[0]["loss"]
    assert (out / "model" / lora.WEIGHTS_FILE).stat().st_size < 0.05 * (world / "init" / "model.safetensors").stat(
        ).st_size  # small enough to share
    result = subprocess.run([sys.executable, "-m", "vlaa_min.lora", "merge", "--adapter", str(out / "model"), "--out",
                             str(world / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    merged = VLModel.from_pretrained(world / "merged").eval()  # a plain HF checkpoint
    adapted_model = lora.load_lora_model(out / "model").eval()
    processor = Processor.from_pretrained(world / "merged")
    batch = processor.collate_prompts([processor.encode_prompt("Which letter is right?", [])])
    with torch.no_grad():
        expected = adapted_model(batch.input_ids, batch.position_ids, batch.attention_mask)
        inputs = (batch.input_ids, batch.position_ids, batch.attention_mask)
        torch.testing.assert_close(merged(*inputs), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding, any threads
        folded_on_load = VLModel.from_pretrained(out / "model").eval()  # what evaluate.py does with model/
        torch.testing.assert_close(folded_on_load(*inputs), expected, rtol=1e-5, atol=1e-5)


def _initial_adapters(cfg) -> dict[str, torch.Tensor]:
    """The adapters a run starts from (PEFT names): A as the trainer draws it after seed_everything, B = 0."""
    seed_everything(cfg.seed)
    model = VLModel.from_pretrained(cfg.model)
    lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return {lora.to_peft_name(name): t for name, t in lora.adapter_state(model.state_dict()).items()}


def test_a_lora_grpo_step_on_two_ranks_is_one_process_step(world):
    """FSDP2 with LoRA: the frozen base sharded, only the adapters' gradients reduced; mu = 2 updates, beta > 0
    (the reference: the sharded policy with its adapters off). The bounds of test_distributed's
    _assert_same_update: entries that AdamW moved by more than lr / 4 agree to steps * lr * 1e-3 (lr / 4, not
    lr / 2: A has no gradient at B = 0, so it moves only in the second update, at the cosine's lower lr)."""
    from tests.test_distributed import _grpo as grpo_settings, _run_ranks

    lr, steps = 1e-3, 2  # mu = 2: two AdamW updates
    settings = dict(lora_rank=4, lora_alpha=8.0, lora_rollout="adapters", lr=lr)
    cfg = grpo_settings(world, "lora-1", **settings)
    _fixed_rollouts_then(train_grpo.main, cfg)
    _run_ranks(2, _fixed_rollouts_then, train_grpo.main, grpo_settings(world, "lora-2", **settings))
    start = _initial_adapters(cfg)
    one, two = _adapter(world / "lora-1" / "model"), _adapter(world / "lora-2" / "model")
    assert start.keys() == one.keys() == two.keys()
    sure = total = 0
    for name, after in one.items():
        moved = (after - start[name]).abs()
        assert (moved <= steps * lr * 1.01).all(), name  # AdamW moves an entry by at most ~lr a step
        confident = moved > lr / 4
        tight = steps * lr * 1e-3 + 4 * torch.finfo(torch.float32).eps * (after.abs() + lr)
        bound = torch.where(confident, tight, torch.full_like(tight, 2 * steps * lr))
        assert ((after - two[name]).abs() <= bound).all(), name
        sure, total = sure + int(confident.sum()), total + int((moved > 0).sum())
    assert total > 0 and sure > 0.5 * total
    metrics = [read_metrics(world / out / "metrics.jsonl")[0] for out in ("lora-1", "lora-2")]
    for key in ("loss", "kl", "grad_norm"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-9), key
