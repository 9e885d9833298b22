#!/usr/bin/env bash
# The whole GPU check in one go, within 11 minutes on one H200 (the sum of the parts' limits; the Qwen3-VL part is
# not yet timed there): the CUDA tests (CUDA graphs against eager token for token, compiled against eager, host
# syncs per step, ...), the tiny-config rollout bench, and the rollout bench at Qwen2.5-VL-3B's full depth in bf16
# (8 prompts x G = 8 and G = 4, 512 new tokens each, peak memory), then at Qwen3-VL-2B's (G = 8): ours with CUDA
# graphs against transformers' default generate and its static-cache + compile setting. Each part has a time limit,
# so one slow part cannot eat the others' time; the benches print every timed call as it ends.
#
#   bash bench/gpu.sh                   # results in $OUT if set, else runs/gpu/; summary.txt first
#
# transformers: the pinned version (constraints.txt) is used when installed. Otherwise it is installed from wheels/
# if that folder came along (the GPU machine reaches no index), made beforehand on a machine that can:
#   pip download -d wheels -c constraints.txt --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       transformers pytest pillow
# and else from the index (pip install -c constraints.txt transformers). The GPU's own torch is kept.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONPATH=$PWD  # the benches import this checkout's vlaa_min
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi; $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__)"; } > "$OUT/env.txt" 2>&1
pinned=$(sed -n 's/^transformers==//p' constraints.txt)
installed=$($PY -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo none)
if [ "$installed" != "$pinned" ]; then
    if [ -d wheels ]; then
        $PY -m pip install -q --no-index --find-links wheels -c constraints.txt "transformers==$pinned" pytest pillow
    else
        $PY -m pip install -q -c constraints.txt "transformers==$pinned"
    fi > "$OUT/pip.txt" 2>&1
fi
summary "transformers $($PY -c 'import transformers; print(transformers.__version__)' 2>&1 | tail -1)" \
    "(pinned $pinned, found $installed); $(tail -1 "$OUT/env.txt")"

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, its output in $OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    summary "== $name: exit $? after $((SECONDS - start)) s (limit $limit): $*"
    grep -E '^\||passed|failed|error' "$OUT/$name.txt" | tail -n 8 | tee -a "$OUT/summary.txt"
}

part tests 100 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
part bench_3b_g8 170 $PY bench/generate.py --config qwen2.5-vl-3b --prompts 8 --samples 8 --new-tokens 512 --repeats 2
part bench_3b_g4 150 $PY bench/generate.py --config qwen2.5-vl-3b --prompts 8 --samples 4 --new-tokens 512 --repeats 2
part bench_qwen3_2b_g8 170 $PY bench/generate.py --config qwen3-vl-2b --prompts 8 --samples 8 --new-tokens 512 --repeats 2
part bench_tiny 50 $PY bench/generate.py --device cuda --repeats 5
# LoRA (issue 30): merged vs unmerged rollouts at 3B widths, and the memory plan's count against the measured peaks
part lora_rollout_3b 120 $PY bench/lora_rollout.py --config qwen2.5-vl-3b --prompts 8 --samples 4 --new-tokens 256 \
    --repeats 2 --device cuda
part memory_3b_lora 200 $PY bench/memory.py --size 3b --ranks 1 --lora-rank 16 --prompts 16 --new-tokens 256 \
    --prompt-length 1024 --device cuda
