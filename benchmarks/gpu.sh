#!/usr/bin/env bash
# GPU throughput figures: original vs converted models, timed side by side in one process.
#   OUT=dir bash benchmarks/gpu.sh        (torch with CUDA and timm installed; evoplug from this tree)
# Writes the GPU/driver/versions, one Markdown table and JSON file per run under $OUT.
set -u
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
run() { local tag=$1; shift; echo "+ evoplug bench $*"
        $PY -m evoplug bench "$@" --device cuda --dtype float16 --batch 256 --repeats 10 --warmup 3 \
            --no-progress --markdown --json "$OUT/$tag.json" > "$OUT/$tag.md" 2>&1; grep -v "^|" "$OUT/$tag.md" | grep -v Warn; }
# eager, float16, batch 256, keep 0.5 and 1.0
run eager_fp16_b256 deit_tiny_patch16_224 deit_small_patch16_224 deit_base_patch16_224 levit_256 \
    pvt_v2_b1 twins_svt_small swin_tiny_patch4_window7_224 --keep 0.5 1.0
# torch.compile with CUDA graphs (mode reduce-overhead): no per-op host cost
run compiled_ro_deit deit_small_patch16_224 deit_base_patch16_224 --keep 0.5 --compile reduce-overhead
run compiled_ro_swin swin_tiny_patch4_window7_224 --keep 0.5 --compile reduce-overhead
