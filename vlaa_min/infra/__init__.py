"""The run machinery: what keeps a run alive and resumable, not the algorithm. Skip it on a first read.

cli          flags from a config dataclass, one-line errors        run_folder   the --out folder, its lock, resume
train_state  checkpoints of the optimizer, sampler and RNGs         checkpoint   atomic safetensors directories
distributed  FSDP2 under torchrun (no-ops in one process)           runtime      device, autocast dtype, seeds
decode_graphs  CUDA graphs of the decode step                       rehearsal    offline stand-ins of the real inputs
"""
