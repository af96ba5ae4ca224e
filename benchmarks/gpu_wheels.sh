#!/usr/bin/env bash
# The wheels benchmarks/gpu_all.sh installs on a GPU machine that cannot reach a package index
# (docs/gpu.md "How the GPU figures are made"): pure-Python wheels for Python 3.12, without their
# dependencies (the machine has torch, numpy, opencv, matplotlib, rich, einops, ...), into .whl/
# (ignored by git; carry it to the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl addict==2.4.0 importlib_metadata==10.2.0 lazy-importer==0.1.0 mat4py==0.6.0 \
    mmcv-lite==2.1.0 mmengine==0.10.7 mmpretrain==1.2.0 model-index==0.1.11 modelindex==0.0.2 \
    ordered-set==4.1.0 platformdirs==4.14.8 termcolor==3.3.0 timm==1.0.31 yapf==0.43.0
ls .whl
