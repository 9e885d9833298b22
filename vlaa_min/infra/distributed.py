"""Everything the trainers need to run under torchrun with FSDP2; a no-op in a plain single process.

    device = distributed.setup("auto")             # torchrun env -> process group (NCCL on GPU, gloo on CPU)
    distributed.shard(model, device)               # fully_shard each vision block, decoder layer, then the root
    with distributed.gathered(policy): rollout     # full weights on every rank for the whole rollout
    total = distributed.all_reduce_sum(x)          # sums across ranks (returns x itself in one process)

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps 1/N of every parameter, gradient and AdamW moment on each
rank, gathers a block's weights just before its forward/backward and frees them after. Precision is a
MixedPrecisionPolicy: on GPU the fp32 master shards are gathered as bf16 for compute and gradients are
reduce-scattered in fp32; on CPU everything stays fp32, so N ranks reproduce one process up to the order of
float additions (tests/test_distributed.py).

Rollouts decode hundreds of one-token steps: gathering every layer at every step would cost one all-gather of
the whole model per token. `gathered` all-gathers once per rollout instead and keeps the weights until it ends,
so during a rollout each rank holds the full model in compute precision (2 bytes/parameter on GPU, e.g. 16.6 GB
for 7B; 4 on CPU) on top of its shards; the KV cache comes on top of that (bench/memory.py measures both).
"""

import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from vlaa_min.infra.runtime import resolve_device

# Whole tensors, gathered to rank 0's CPU (the other ranks get {}): what an HF checkpoint holds.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def setup(device_name: str) -> torch.device:
    """Join the torchrun job when there is one (WORLD_SIZE in the environment); the device this rank uses."""
    device = resolve_device(device_name)
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints; errors (stderr) still come from every rank
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fully_shard every vision block and decoder layer, then the root (embeddings, lm_head, norms, merger).

    The root also covers `encode_prefix`, the second entry point the trainers call besides forward. In place;
    returns the model. Nothing happens in a single process.
    """
    if not is_distributed():
        return model
    # A decoder layer also returns its keys/values, views that nothing modifies in place: FSDP2's warning about
    # in-place ops on returned views does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # fp32 compute and reduction
    for block in model.visual.blocks:
        fully_shard(block, mp_policy=policy)
    for layer in model.language_model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "encode_prefix")
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            # Sum, not average, the ranks' gradients: the trainers divide the loss by the global count. A plain
            # SUM collective (gloo has no pre-scaled sum).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Keep `model`'s full weights on every rank for the whole block (one all-gather, not one per decode step)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in units if m is not model]  # the root already keeps its weights between forwards
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)


def all_reduce_sum(value: float) -> float:
    """A number summed over the ranks (in float64, so that counts stay exact)."""
    if not is_distributed():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return type(value)(tensor.item()) if isinstance(value, int) else tensor.item()


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order ([value] in one process)."""
    if not is_distributed():
        return [value]
    gathered_values = [None] * world_size()
    dist.all_gather_object(gathered_values, value)
    return gathered_values


def broadcast_object(value):
    """Rank 0's `value` on every rank (`value` itself in one process)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor for sharded gradients: its value as a float."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --------------------------------------------------------------------------- checkpoints


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights (on rank 0; {} on the others under FSDP). Every rank must call it: it all-gathers."""
    if not isinstance(model, FSDPModule):
        return model.state_dict()
    model.reshard()  # the root keeps its gathered weights after a forward without backward (an eval)
    return get_model_state_dict(model, options=FULL)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state (rank 0), keyed by parameter name under FSDP; a collective like model_state."""
    if not isinstance(model, FSDPModule):
        return optimizer.state_dict()
    model.reshard()
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Full weights (every rank has them) into the model, each rank keeping its shard. strict=False: only some
    of the model's tensors (a LoRA adapter's)."""
    if not isinstance(model, FSDPModule):
        model.load_state_dict(weights, strict=strict)
        return
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not isinstance(model, FSDPModule):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
