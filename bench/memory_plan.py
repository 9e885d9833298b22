"""The memory plan: what one GPU needs for GRPO, per model and mode, counted analytically; which of 24 / 48 / 80 GB
it fits and with which flags.

Per phase of a train_grpo.py step on one GPU (bf16 compute; bytes, no weight allocated: parameter counts come from
the model built on the meta device), at the paper preset (vlaa_min/presets.py) unless flags say otherwise:
  resident   full: fp32 master weights 4 P, AdamW moments 8 T (T = trainable: all but the vision tower), the bf16
             reference 2 P; LoRA: the bf16 base 2 P, adapters + their grads and moments 16 A, no reference copy
  rollout    one engine call of P_r prompts (--rollout-batch-size; all of the step's by default): + keys/values in
             bf16 of every prompt once (P_r x S tokens) and of its G samples (P_r G x new tokens), + the prefill's
             largest transient (all P_r S tokens through one MLP: 3 I + 2 D values a token), + the sampling logits
             (P_r G x V, fp32, x 3 for softmax and sampling); LoRA merged: + 2 L (L = the adapted weights, kept to
             restore them). The finished calls' completions wait on the host.
  reference  + one no-grad forward of a micro-batch (m / G prompts x S + m x new tokens): one layer's transient
             + a logits chunk (2^27 fp32 logits, x 3)
  update     + fp32 gradients 4 T (LoRA: counted in 16 A) + the activations saved for backward: per token and
             decoder layer 22 D + 8 D_kv + 8 I bytes in bf16 (+ 10 D full, + 2 r per adapted linear LoRA;
             saved_per_layer), or with gradient checkpointing each layer's input (full: 4 D, its residual stream
             is fp32; LoRA: 2 D) plus one layer's; + autocast's bf16 copies of fp32 weights, saved for backward
             (full: 2 x the decoder's linears and the head; LoRA: 2 A), one layer's under checkpointing; + logits
The allocator's fragmentation and CUDA's context (~0.5-1 GB) are not counted; a plan "fits" a card when its largest
phase is counted at 90% of the card or less (HEADROOM: the count runs up to 9% under bench/memory.py's peaks).

    python bench/memory_plan.py                      # the table of docs/memory.md
    python bench/memory_plan.py --check              # the count against bench/memory.py's CPU measurement
    python bench/memory_plan.py --saved              # the activation terms against autograd's saved bytes
"""

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlaa_min import lora  # noqa: E402
from vlaa_min.config import ModelConfig  # noqa: E402
from vlaa_min.model import VLModel  # noqa: E402
from vlaa_min.presets import PRESETS  # noqa: E402

GIB = 2**30
PAPER = PRESETS["GRPOConfig"]["paper"]
CARDS = (24, 48, 80)
HEADROOM = 0.9  # a plan fits when its count is within 90% of the card: counts run up to 9% under measured peaks
LOGITS_CHUNK = 2**27  # vlaa_min/logprobs.py's LOGITS_PER_CHUNK


def qwen2_vl_2b() -> ModelConfig:
    """Qwen2-VL-2B-Instruct's widths (its config.json as published)."""
    return ModelConfig.from_hf_dict({
        "model_type": "qwen2_vl", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "tie_word_embeddings": True, "max_position_embeddings": 32768,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}})


MODELS = {
    "Qwen2-VL-2B": qwen2_vl_2b,
    "Qwen2.5-VL-3B": lambda: ModelConfig.qwen2_5_vl("3b"),
    "Qwen2.5-VL-7B": lambda: ModelConfig.qwen2_5_vl("7b"),
    "Qwen3-VL-2B": lambda: ModelConfig.qwen3_vl("2b"),
    "Qwen3-VL-4B": lambda: ModelConfig.qwen3_vl("4b"),
    "Qwen3-VL-8B": lambda: ModelConfig.qwen3_vl("8b"),
}


@dataclass
class Counts:
    """Parameter counts and widths of one model, from the meta device."""

    params: int
    trainable: int  # all but the vision tower
    adapted: int  # the weights LoRA adapts
    adapter: int  # the adapters' parameters at the given rank
    rank_products: int  # r x the adapted linears of one layer: the rank-r values LoRA saves a token and layer
    layer_linears: int  # one decoder layer's nn.Linear weights
    head: int  # lm_head's weight
    layers: int
    hidden: int
    kv_width: int  # D_kv = kv heads x head dim
    intermediate: int
    vocab: int


def count(config: ModelConfig, rank: int, targets: str = lora.DEFAULT_TARGETS) -> Counts:
    with torch.device("meta"):
        model = VLModel(config)
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.visual.parameters())
    adapted = adapter = 0
    for name, module in model.named_modules():
        if name.startswith(lora.DECODER) and name.rsplit(".", 1)[-1] in targets.split(",") and isinstance(
                module, nn.Linear):
            adapted += module.weight.numel()
            adapter += rank * (module.in_features + module.out_features)
    layer = model.language_model.layers[0]
    adapted_per_layer = sum(name.rsplit(".", 1)[-1] in targets.split(",") for name, _ in layer.named_modules())
    layer_linears = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    text = config.text
    return Counts(params, params - vision, adapted, adapter, rank * adapted_per_layer, layer_linears,
                  model.lm_head.weight.numel(), text.num_hidden_layers, text.hidden_size,
                  text.num_key_value_heads * text.head_dim, text.intermediate_size, text.vocab_size)


@dataclass
class Setting:
    prompts: int = PAPER["prompts_per_step"]
    group: int = PAPER["group_size"]
    new_tokens: int = PAPER["max_new_tokens"]
    prompt_tokens: int = PAPER["max_prompt_length"]  # the worst case; --max-pixels shortens image prompts
    micro: int = PAPER["micro_batch_size"]
    rollout_batch: int = 0  # prompts per engine call (0: all `prompts` at once)


def phases(c: Counts, s: Setting, mode: str, checkpointing: bool, weight_bytes: int = 2, master: int = 4) -> dict:
    """Peak bytes of the rollout, the reference pass and the update (see the docstring). mode: full | lora;
    weight_bytes: the compute dtype's (2: bf16 on a GPU); master: full fine-tuning's weights' (4: fp32)."""
    b = weight_bytes
    if mode == "full":
        resident = master * c.params + 8 * c.trainable + b * c.params  # weights, AdamW moments, reference
        grads, merge_copy = 4 * c.trainable, 0
    else:
        resident = b * c.params + 16 * c.adapter  # the frozen base; adapters + grads + moments
        grads, merge_copy = 0, b * c.adapted
    prompts = s.rollout_batch or s.prompts  # in one engine call
    rows = prompts * s.group
    kv_per_token = c.layers * 2 * c.kv_width * b
    layer_transient = 3 * c.intermediate + 2 * c.hidden  # values a token, one layer's MLP at a time
    rollout = (resident + merge_copy + kv_per_token * (prompts * s.prompt_tokens + rows * s.new_tokens)
               + b * prompts * s.prompt_tokens * layer_transient + 3 * 4 * rows * c.vocab)
    tokens = (s.micro // s.group or 1) * s.prompt_tokens + s.micro * s.new_tokens  # shared prefix: once per prompt
    logits = 3 * 4 * min(LOGITS_CHUNK, tokens * c.vocab)
    reference = resident + b * tokens * layer_transient + logits
    per_layer = saved_per_layer(c, mode, b)
    # full fine-tuning's residual stream is in the master weights' dtype (the embedding's output, fp32 + bf16 sums)
    residual = master if mode == "full" else b
    casts = weight_copies(c, mode, b, master, 1 if checkpointing else c.layers)
    if checkpointing:
        activations = tokens * (c.layers * residual * c.hidden + per_layer)
    else:
        activations = tokens * c.layers * per_layer
    update = resident + grads + activations + casts + logits
    return {"rollout": rollout, "reference": reference, "update": update}


def saved_per_layer(c: Counts, mode: str, compute_bytes: int) -> int:
    """Bytes a token that one decoder layer saves for backward (`--saved` measures them). Kept, per token: both
    RMSNorms' inputs (fp32 in both dtypes), the linears' inputs, q, k, v and attention's output, the MLP's four
    (d_ff,) tensors (gate, act(gate), up, their product); full fine-tuning also the two normalised values (for the
    norms' weights' gradients), LoRA each adapted linear's rank-r product A x (for B's gradient)."""
    d, kv, ff = c.hidden, c.kv_width, c.intermediate
    if compute_bytes == 4:  # fp32 throughout (a CPU run): 9 (full) or 7 (LoRA) D-wide tensors, 4 bytes each
        base = 28 * d + 8 * kv + 16 * ff
        return base + (8 * d if mode == "full" else 4 * c.rank_products)
    # bf16 autocast: norm inputs fp32, the rest bf16; full fine-tuning's fp32 norm weights give fp32 products
    base = 22 * d + 8 * kv + 8 * ff
    return base + (10 * d if mode == "full" else 2 * c.rank_products)


def weight_copies(c: Counts, mode: str, compute_bytes: int, master: int, layers: int) -> int:
    """Bytes of autocast's low-precision copies of fp32 weights, saved for backward in `layers` layers at once (one
    under gradient checkpointing): full fine-tuning's linears and head, LoRA's adapters (always fp32)."""
    if mode == "full":
        return compute_bytes * (c.head + layers * c.layer_linears) if compute_bytes < master else 0
    return compute_bytes * c.adapter // c.layers * layers if compute_bytes < 4 else 0


def fitting_flags(c: Counts, mode: str, checkpointing: bool, card: int) -> str:
    """The flags that bring the peak under `card` GB, changing the algorithm the least: the prompts per engine call
    first (the rollout's keys/values; the same rollout of 512 prompts, in chunks), then the micro-batch (the same
    updates), then shorter prompts (--max-pixels), then fewer new tokens."""
    for new_tokens in (1024, 512):
        for prompt_tokens in (2048, 1024):
            for micro in (8, 4, 2, 1):
                for rollout_batch in (0, 256, 128, 64, 32, 16, 8):
                    s = Setting(micro=micro, new_tokens=new_tokens, prompt_tokens=prompt_tokens,
                                rollout_batch=rollout_batch)
                    if max(phases(c, s, mode, checkpointing).values()) <= HEADROOM * card * 1e9:
                        flags = [f"--rollout-batch-size {rollout_batch}" if rollout_batch else "",
                                 f"--micro-batch-size {micro}" if micro != 8 else "",
                                 f"--max-new-tokens {new_tokens}" if new_tokens != 1024 else "",
                                 "--max-pixels 401408 --max-prompt-length 1024" if prompt_tokens != 2048 else ""]
                        return " ".join(f for f in flags if f) or "the paper preset"
    return "does not fit"


def table(rank: int) -> str:
    lines = ["| model | mode | grad. ckpt | rollout GB | reference GB | update GB | 24 GB | 48 GB | 80 GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, make in MODELS.items():
        c = count(make(), rank)
        for mode in ("full", "lora"):
            for checkpointing in (False, True):
                peaks = phases(c, Setting(), mode, checkpointing)
                cells = [fitting_flags(c, mode, checkpointing, card) for card in CARDS]
                label = "full" if mode == "full" else f"LoRA r={rank}"
                lines.append(f"| {name} | {label} | {'on' if checkpointing else 'off'} | "
                             + " | ".join(f"{peaks[k] / 1e9:.1f}" for k in ("rollout", "reference", "update"))
                             + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CHECK = dict(size="3b", layers=4, vision_depth=2, vocab_size=8192, prompts=4, group_size=2, new_tokens=32,
             prompt_length=128, grpo_micro=4, image_size=112)


def check() -> None:
    """Count vs bench/memory.py's measured peak RSS (one CPU process, fp32) at reduced depth, full and LoRA."""
    import json
    import tempfile

    config = ModelConfig.qwen2_5_vl(CHECK["size"], layers=CHECK["layers"], vision_depth=CHECK["vision_depth"])
    config.text.vocab_size = CHECK["vocab_size"]
    setting = Setting(prompts=CHECK["prompts"], group=CHECK["group_size"], new_tokens=CHECK["new_tokens"],
                      prompt_tokens=CHECK["prompt_length"], micro=CHECK["grpo_micro"])
    base = baseline_gib()
    print(f"process baseline (python + torch + vlaa_min imported): {base:.2f} GiB, subtracted")
    print("| mode | phase | counted GiB | measured GiB | error |\n|---|---|---|---|---|")
    for rank in (0, 16):
        with tempfile.TemporaryDirectory() as tmp:
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in CHECK.items()]
            subprocess.run([sys.executable, str(REPO / "bench/memory.py"), *flags, "--ranks", "1", "--device", "cpu",
                            "--lora-rank", str(rank), "--update-micro-batches", "1", "--phase", "grpo",
                            "--result", f"{tmp}/out.json"], check=True, cwd=REPO, capture_output=True)
            measured = json.loads(Path(f"{tmp}/out.json").read_text())[0]
        mode = "lora" if rank else "full"
        counted = phases(count(config, rank or 1), setting, mode, False, weight_bytes=4)
        for phase in ("rollout", "update"):
            got = measured[f"{phase}_gib"] - base
            print(f"| {mode} | {phase} | {counted[phase] / GIB:.2f} | {got:.2f} | "
                  f"{100 * (counted[phase] / GIB - got) / got:+.0f}% |")


def saved() -> None:
    """saved_per_layer (+ autocast's weight copies) against what autograd saves: one decoder layer's share (a
    2-layer minus a 1-layer forward) at 3B widths, counted by storage, parameters excluded; fp32 and CPU autocast
    bf16 (the same casts as CUDA's autocast)."""
    batch, length, rank = 2, 64, 16
    print(f"one decoder layer's saved bytes, {batch} x {length} tokens, Qwen2.5-VL-3B widths\n"
          "| mode | compute | counted MiB | measured MiB | error |\n|---|---|---|---|---|")
    for mode in ("full", "lora"):
        for dtype in (torch.float32, torch.bfloat16):
            one, two = (saved_bytes(layers, mode, rank, dtype, batch, length) for layers in (1, 2))
            config = ModelConfig.qwen2_5_vl("3b", layers=2)
            c, b = count(config, rank), dtype.itemsize
            copies = weight_copies(c, mode, b, 4, 2) - weight_copies(c, mode, b, 4, 1)  # one layer's share
            counted = batch * length * saved_per_layer(c, mode, b) + copies
            print(f"| {mode} | {str(dtype)[6:]} | {counted / 2**20:.2f} | {(two - one) / 2**20:.2f} | "
                  f"{100 * (counted - (two - one)) / (two - one):+.1f}% |")


def saved_bytes(layers: int, mode: str, rank: int, dtype: torch.dtype, batch: int, length: int) -> int:
    """Bytes autograd saves (parameters excluded) in one training forward of a text batch, `layers` deep."""
    torch.manual_seed(0)
    config = ModelConfig.qwen2_5_vl("3b", layers=layers, vision_depth=1)
    config.text.vocab_size = 1024  # the head is outside the layers: any size
    model = VLModel(config).train()
    model.visual.requires_grad_(False)
    if mode == "lora":  # as bench/memory.py builds it: the base in the compute dtype, fp32 adapters
        model.to(dtype)
        lora.apply_lora(model, rank, 2.0 * rank, 0.0, lora.DEFAULT_TARGETS)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 1000, (batch, length))
    with (torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)):
        model(ids, torch.arange(length).expand(3, batch, length), torch.ones_like(ids, dtype=torch.bool),
              return_hidden=True)
    return sum(storages.values())


def baseline_gib() -> float:
    code = ("import sys; sys.path.insert(0, 'bench'); import memory; from pathlib import Path; "
            "s = Path('/proc/self/status').read_text(); "
            "print(int(next(l for l in s.splitlines() if l.startswith('VmHWM')).split()[1]) / 2**20)")
    return float(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoRA rows")
    parser.add_argument("--check", action="store_true", help="the count against a measured CPU run")
    parser.add_argument("--saved", action="store_true", help="the activation count against autograd's saved bytes")
    args = parser.parse_args()
    if args.check:
        check()
    elif args.saved:
        saved()
    else:
        print(table(args.rank))


if __name__ == "__main__":
    main()
