#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (docs/gpu.md): the GPU form of the distributed
# training test (issue 13: NCCL, one rank per GPU, --amp float16, resume, strict dense load),
# then the benchmark suite (benchmarks/gpu.sh, issue 12) in the time that is left.
#
#   BUNDLE=$OUT bash benchmarks/gpu_all.sh      # on the GPU machine
#
# Environment (all optional):
#   TOTAL_S   seconds this script may take in all (default 480); the suite gets what the
#             test leaves, less 25 s for its exit and the bundle
#   DDP_S     the most the distributed test may take (default 150)
#   BUNDLE    folder for the few files that come back: the suite's bundle (gpu.sh), and
#             ddp_pytest.txt, gpu_ddp_log.txt, gpu_ddp_rank0.jsonl
#   PY        the Python with torch (default python3)
# Packages the machine lacks (MMEngine, MMPretrain, mmcv-lite and their pure-Python needs, a
# pinned timm) travel as wheels in .whl/ (see docs/gpu.md); they are installed into /tmp/site.
set -u -o pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
TOTAL_S=${TOTAL_S:-480}
DDP_S=${DDP_S:-150}
PY=${PY:-python3}
BUNDLE=${BUNDLE:-bench_out/gpu_bundle}
mkdir -p "$BUNDLE"
DDP_TXT="$BUNDLE/ddp_pytest.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$DDP_TXT" 2>&1 && echo "wheels from .whl/ installed into /tmp/site" >> "$DDP_TXT"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PY -c "import torch, timm; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'timm', timm.__version__, 'nccl', torch.cuda.nccl.version())"
  echo "+ pytest tests/test_distributed.py -k gpu (at most $DDP_S s)"; } >> "$DDP_TXT" 2>&1
EVOPLUG_TEST_OUT="$BUNDLE" timeout -k 10 "$DDP_S" $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_distributed.py -k gpu >> "$DDP_TXT" 2>&1
echo "pytest exit $? after $(( $(date +%s) - START )) s" >> "$DDP_TXT"
tail -3 "$DDP_TXT"

LEFT=$(( TOTAL_S - ($(date +%s) - START) - 25 ))
OUT=${SUITE_OUT:-/tmp/gpu} BUNDLE="$BUNDLE" PY=$PY HARD_S=$LEFT BUDGET_S=$(( LEFT - 20 )) \
    bash benchmarks/gpu.sh
