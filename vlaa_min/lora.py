"""LoRA on the decoder's linear layers: W x + (alpha / r) B A dropout(x), in PEFT's on-disk format.

Each targeted nn.Linear of the language model (by default every attention and MLP projection of every decoder
layer: q, k, v, o, gate, up, down) becomes a LoRALinear: the same frozen weight W (d_out, d_in) and bias, plus
A (r, d_in), Kaiming-uniform as nn.Linear initialises, and B (d_out, r), zero, so that at step 0 the model is the
base model. The adapters are fp32 and the only parameters that train; the base may be bf16 (on a GPU) and the
vision tower is never adapted.

    names = apply_lora(model, rank=16, alpha=32, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,"
                       "up_proj,down_proj", base="Qwen2.5-VL-3B-Instruct")
    with adapters_off(model): ...          # the base model: GRPO's KL reference, no second copy of the weights
    with merged(model): ...                # W + (alpha / r) B A in W's place (rollouts), W restored bit for bit
    save_adapter(directory, model)         # adapter_config.json + adapter_model.safetensors, PEFT's names
    python -m vlaa_min.lora merge --adapter runs/grpo/model --out runs/grpo-merged   # a full HF checkpoint

On disk an adapter is what PEFT writes for transformers' own Qwen-VL: tensors named base_model.model.model.
language_model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight, and an adapter_config.json whose
base_model_name_or_path names the base checkpoint; `PeftModel.from_pretrained(hub_model, directory)` loads it
(tests/test_lora.py), and VLModel.from_pretrained(directory) loads the base with the adapter folded in.
"""

import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlaa_min.infra.cli import ConfigError, UserError

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
DECODER = "language_model.layers."  # our names of the decoder layers; the vision tower is `visual.*`
PEFT_PREFIX = "base_model.model.model."  # PEFT's wrapper + transformers' own module path (model.language_model...)


@dataclass
class LoRASettings:
    rank: int
    alpha: float
    dropout: float
    targets: list[str]  # leaf names of the adapted linears, e.g. ["q_proj", "v_proj"]
    base: str  # the base checkpoint directory (adapter_config.json's base_model_name_or_path)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus (alpha / r) B A dropout(x); its own weight/bias keep the base's names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)  # (r, d_in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.enabled = True  # False: the base layer (adapters_off)
        self.merged = False  # True: W already holds W + scaling B A (merged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., d_out)
        if not self.enabled or self.merged:
            return out
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))  # (..., d_out), fp32
        return out + (self.scaling * delta).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(d_out, d_in) fp32: scaling B A, what merging adds to W."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def check_flags(cfg) -> None:
    """The trainers' --lora-* flags that cannot work, before anything loads (cfg: SFTConfig or GRPOConfig)."""
    if cfg.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {cfg.lora_rank}")
    if not cfg.lora_rank:
        return
    if not cfg.lora_alpha > 0:
        raise ConfigError(f"--lora-alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.freeze_vision:
        raise ConfigError("--lora-rank adapts the decoder only; the vision tower stays frozen: "
                          "--freeze-vision false needs full fine-tuning (--lora-rank 0)")


def base_dtype(rank: int, device: torch.device) -> torch.dtype:
    """The weights' dtype at load: fp32 master weights for full fine-tuning; with LoRA a frozen base, bf16 on a
    GPU (the adapters are fp32 whatever the base)."""
    return torch.bfloat16 if rank and device.type == "cuda" else torch.float32


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def parse_targets(targets: str | list[str]) -> list[str]:
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    return [name.strip() for name in names if name.strip()]


def decoder_linear_names(model_dir: str | os.PathLike) -> list[str]:
    """The leaf names of a decoder layer's nn.Linears for the checkpoint's config, read without any weight."""
    from vlaa_min.config import ModelConfig  # here: model.py imports this file (adapter directories)
    from vlaa_min.model import DecoderLayer

    config = ModelConfig.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))
    with torch.device("meta"):
        layer = DecoderLayer(config.text, config.family, 0)
    return sorted({name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model_dir: str | os.PathLike, targets: str | list[str]) -> list[str]:
    """The --lora-targets as a list; a name no decoder linear has is an error (before any weight is read)."""
    names, available = parse_targets(targets), decoder_linear_names(model_dir)
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ConfigError(f"--lora-targets {','.join(names) or '(empty)'}: {', '.join(unknown) or 'no layer'} "
                          f"matches no linear layer of {model_dir}'s decoder (it has: {','.join(available)})")
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str | list[str],
               base: str = "") -> list[str]:
    """Freeze the whole model and wrap every decoder linear named in `targets` in a LoRALinear, in place.

    Returns the wrapped modules' names; the adapters (fp32) are then the model's only trainable parameters."""
    targets = parse_targets(targets)
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith(DECODER) and leaf in targets and type(module) is nn.Linear:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    found = {name.rsplit(".", 1)[-1] for name in wrapped}
    if missing := [t for t in targets if t not in found]:
        raise ConfigError(f"--lora-targets: {','.join(missing)} matches no linear layer of the decoder")
    model.lora = LoRASettings(rank, alpha, dropout, targets, base)
    return wrapped


def describe(model: nn.Module) -> str:
    """One line for the start of a run: what is adapted, how many parameters train, the adapter's size."""
    settings, layers = model.lora, lora_layers(model)
    adapter = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA r={settings.rank} alpha={settings.alpha:g} dropout={settings.dropout:g} on {len(layers)} linears "
            f"({','.join(settings.targets)}): {adapter / 1e6:.3f}M trainable parameters of {total / 1e6:.2f}M "
            f"({100 * adapter / total:.2f}%); adapter {adapter * 4 / 2**20:.2f} MiB in fp32")


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model for the block (the KL reference); a no-op for a model without adapters."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


@contextlib.contextmanager
@torch.no_grad()
def merged(model: nn.Module):
    """W + scaling B A in each adapted W's place (in W's dtype) for the block; W is restored exactly after.

    The merge writes into W's own storage (what a compiled or captured decode step reads) and keeps a copy of
    the base W for the block: one extra copy of the adapted weights while it runs."""
    saved = {}
    try:
        for name, layer in lora_layers(model).items():
            saved[name] = layer.weight.detach().clone()
            layer.weight.add_(layer.delta_weight().to(layer.weight.dtype))
            layer.merged = True
        yield
    finally:
        for name, layer in lora_layers(model).items():
            if name in saved:
                layer.weight.copy_(saved[name])
                layer.merged = False


ROLLOUT_MODES = ("merged", "adapters")


def rollout_weights(model: nn.Module, mode: str):
    """The weights a rollout decodes with: `merged` (W + scaling B A, one matmul a layer) or through the adapters.
    Under FSDP, always through the adapters (the gathered weights are FSDP's buffers)."""
    if mode == "merged" and lora_layers(model) and not _sharded(model):
        return merged(model)
    return contextlib.nullcontext()


def rollout_note(model: nn.Module, mode: str) -> str:
    """Which weights the rollouts use, for the start of a run: logp_drift compares them with the trainer's."""
    if mode == "merged" and not _sharded(model):
        return ("rollouts: adapters merged into the weights; logp_drift (trainer vs rollout log-probs) includes "
                "the merge's rounding in the weights' dtype")
    return "rollouts: through the adapters, as the trainer computes them"


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def fold_(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight for good and put plain nn.Linears back: a model save_pretrained writes."""
    for name, layer in lora_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.weight + layer.delta_weight().to(layer.weight.dtype), requires_grad=False)
        linear.bias = layer.bias
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, linear)
    if hasattr(model, "lora"):
        del model.lora
    return model


# --------------------------------------------------------------------------- PEFT's on-disk format


def adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a model's state dict (our names)."""
    return {name: tensor for name, tensor in state_dict.items() if ".lora_A." in name or ".lora_B." in name}


def to_peft_name(name: str) -> str:
    """language_model.layers.0.self_attn.q_proj.lora_A.weight -> base_model.model.model.language_model.layers.0..."""
    return PEFT_PREFIX + name


def from_peft_name(name: str) -> str:
    """Ours for a PEFT tensor name: transformers 5's module path, or the older model.layers.* one."""
    inner = name.removeprefix("base_model.model.").replace(".lora_A.default.", ".lora_A.").replace(
        ".lora_B.default.", ".lora_B.")
    for prefix in ("model.language_model.", "model."):
        if inner.startswith(prefix):
            return "language_model." + inner[len(prefix):]
    raise UserError(f"adapter tensor {name!r} is not a decoder layer's (this code adapts only the language model)")


def peft_config(settings: LoRASettings) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields; target_modules a regex, so that only the decoder matches
    (the vision tower has gate/up/down projections too)."""
    pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(settings.targets)})"
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": settings.base, "r": settings.rank,
            "lora_alpha": settings.alpha, "lora_dropout": settings.dropout, "target_modules": pattern,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True}


def save_adapter(directory: str | os.PathLike, model: nn.Module,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into `directory` (made atomic by the caller).

    state_dict: the full weights to take the adapters from (a sharded model's, gathered) instead of the model's."""
    tensors = adapter_state(model.state_dict() if state_dict is None else state_dict)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config(model.lora), indent=2) + "\n")
    save_file({to_peft_name(n): t.detach().float().contiguous() for n, t in tensors.items()},
              str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def is_adapter(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).exists()


def read_adapter(directory: str | os.PathLike) -> tuple[LoRASettings, dict[str, torch.Tensor]]:
    """An adapter directory (ours or PEFT's): its settings and its tensors under our names."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise UserError(f"{directory / CONFIG_FILE}: only plain LoRA adapters load here (peft_type LORA, no DoRA "
                        f"or rsLoRA)")
    tensors = {from_peft_name(n): t for n, t in load_file(str(directory / WEIGHTS_FILE)).items()}
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})
    settings = LoRASettings(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                            targets, config.get("base_model_name_or_path") or "")
    return settings, tensors


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (our names) into a model with the same adapters; every adapter must be given."""
    expected = set(adapter_state(model.state_dict()))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UserError(f"the adapter does not match the model: missing {missing[:3]} ({len(missing)}), "
                        f"unexpected {unexpected[:3]} ({len(unexpected)})")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def load_lora_model(directory: str | os.PathLike, base: str | None = None, dtype=None, device="cpu") -> nn.Module:
    """The base model with the adapter of `directory` applied (trainable, unmerged)."""
    from vlaa_min.model import VLModel

    settings, tensors = read_adapter(directory)
    base = base or settings.base
    if not base or not (Path(base) / "config.json").exists():
        raise UserError(f"{directory}: the adapter's base model {base!r} (base_model_name_or_path in {CONFIG_FILE}) "
                        f"is not a model directory here; name it with --base")
    model = VLModel.from_pretrained(base, dtype=dtype, device=device)
    apply_lora(model, settings.rank, settings.alpha, settings.dropout, settings.targets, base=base)
    load_adapter_weights(model, tensors)
    return model


def merge_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fold a LoRA adapter into its base: a full HF checkpoint.")
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, ...)")
    parser.add_argument("--base", default=None, help="base model directory (default: the adapter's own)")
    parser.add_argument("--out", required=True, help="directory to write the merged model to")
    args = parser.parse_args(argv)
    from vlaa_min.processor import Processor

    model = fold_(load_lora_model(args.adapter, args.base, dtype=torch.float32))
    model.save_pretrained(args.out)
    has_tokenizer = (Path(args.adapter) / "tokenizer_config.json").exists()  # a training run's model/ has one
    Processor.from_pretrained(args.adapter if has_tokenizer else args.base or read_adapter(args.adapter)[0].base
                              ).save_pretrained(args.out)
    print(f"wrote {args.out}: the base with {args.adapter} folded in")


if __name__ == "__main__":
    merge_main()
