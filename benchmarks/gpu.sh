#!/usr/bin/env bash
# GPU throughput figures: original vs converted models, timed side by side in one process.
#   OUT=dir bash benchmarks/gpu.sh        (torch with CUDA and timm installed; evoplug from this tree)
# Writes the GPU/driver/versions, Markdown tables and JSON rows under $OUT.
set -u
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
run() { echo "+ evoplug bench $*"; $PY -m evoplug bench "$@" --no-progress; }
# eager, float16, batch 256
run deit_tiny_patch16_224 deit_small_patch16_224 deit_base_patch16_224 levit_256 pvt_v2_b1 \
    twins_svt_small swin_tiny_patch4_window7_224 \
    --device cuda --dtype float16 --batch 256 --keep 0.5 1.0 --repeats 10 --warmup 3 \
    --markdown --json "$OUT/eager_fp16_b256.json" 2>&1 | tee "$OUT/eager_fp16_b256.md"
# torch.compile, float16, batch 256
run deit_small_patch16_224 swin_tiny_patch4_window7_224 --device cuda --dtype float16 --batch 256 \
    --keep 0.5 --repeats 10 --warmup 3 --compile --markdown \
    --json "$OUT/compile_fp16_b256.json" 2>&1 | tee "$OUT/compile_fp16_b256.md"
