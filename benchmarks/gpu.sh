#!/usr/bin/env bash
# The GPU benchmark suite (issue 12; docs/gpu.md "How the GPU figures are made"): original vs
# evoplug-converted timm models timed side by side in one process, eager and torch.compile
# (default, reduce-overhead), float16 and float32, keep 0.5 and 1.0, a DeiT-S training step and
# a kernel profile, under a time budget. The work itself: benchmarks/gpu_suite.py.
#
#   bash benchmarks/gpu.sh                  # on a CUDA machine; results in $OUT
#   DRY=1 bash benchmarks/gpu.sh            # the same code paths on the CPU, tiny settings
#
# Environment (all optional):
#   OUT       results folder, relative to the repository root (default bench_out/gpu; dry:
#             bench_out/gpu_dry)
#   BUDGET_S  seconds from the start of this script after which no unit may still be running
#             by its estimate (default 420: units that would not fit are skipped and recorded)
#   HARD_S    seconds from the start after which the suite is interrupted, whatever it does
#             (default 450: with the 20 s grace to exit and the bundle, under 8 minutes; what
#             finished before is on disk)
#   BUNDLE    a folder that receives, on every exit, gpu_results.tar.gz (all of $OUT),
#             summary.md, run.log and setup.txt: for a machine that hands back only a few files
#   PY        the Python with torch (default: ./.venv/bin/python if present, else python3)
#   SUITE_ARGS more options of gpu_suite.py (e.g. "--only eager_fp16 --models deit_small_patch16_224")
# Writes into $OUT: setup.txt (what was checked or installed, and what failed), nvidia-smi.txt,
# env.json/env.md (device, driver, versions, settings, plan), one JSON and one Markdown file
# per part, summary.md (ratios next to the targets), run.log.
set -u -o pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
[ "$DRY" = 0 ] && DEFAULT_OUT=bench_out/gpu || DEFAULT_OUT=bench_out/gpu_dry
OUT=${OUT:-$DEFAULT_OUT}
BUDGET_S=${BUDGET_S:-420}
HARD_S=${HARD_S:-450}
BUNDLE=${BUNDLE:-}
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
mkdir -p "$OUT"
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SETUP="$OUT/setup.txt"
log() { echo "$*" | tee -a "$SETUP"; }
# nothing can be measured: say why in summary.md too
fail() {
    log "FAILED: $*"
    printf '# GPU benchmark: nothing measured\n\n%s\n\nSee setup.txt.\n' "$*" > "$OUT/summary.md"
    exit 3
}
# on every exit: all of $OUT as one archive, and the summary and logs beside it
bundle() {
    [ -n "$BUNDLE" ] || return 0
    mkdir -p "$BUNDLE"
    tar czf "$BUNDLE/gpu_results.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
    for f in summary.md run.log setup.txt; do [ ! -f "$OUT/$f" ] || cp "$OUT/$f" "$BUNDLE/$f"; done
}
trap bundle EXIT
: > "$SETUP"
log "start $(date -u '+%Y-%m-%d %H:%M:%S') UTC; DRY=$DRY OUT=$OUT BUDGET_S=$BUDGET_S HARD_S=$HARD_S PY=$PY"

# --- what the machine has -------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit \
                 --format=csv; echo; nvidia-smi; } > "$OUT/nvidia-smi.txt" 2>&1 \
        || log "FAILED: nvidia-smi (exit $?; see nvidia-smi.txt)"
    head -2 "$OUT/nvidia-smi.txt" | tee -a "$SETUP"
else
    log "no nvidia-smi on this machine"
fi
# one Python start for all checks: exit status 1 no torch, 2 no CUDA (not dry), 4 no timm,
# 8 no evoplug (or its dependency tqdm)
CHECK='
import importlib, os, sys
status = 0
for name in ("torch", "timm", "tqdm", "evoplug"):
    try:
        m = importlib.import_module(name)
    except Exception as e:
        print(f"FAILED: import {name}: {type(e).__name__}: {e}")
        status |= {"torch": 1, "timm": 4}.get(name, 8)
        continue
    print(name, getattr(m, "__version__", "?"), "from", os.path.dirname(m.__file__))
    if name == "torch":
        print("CUDA build", m.version.cuda, "cuda available", m.cuda.is_available())
        status |= 2 * (os.environ.get("DRY", "0") == "0" and not m.cuda.is_available())
sys.exit(status)'
DRY=$DRY $PY -c "$CHECK" 2>&1 | tee -a "$SETUP"
ST=${PIPESTATUS[0]}
(( ST & 1 )) && fail "torch does not import with $PY"
(( ST & 2 )) && log "FAILED: torch sees no CUDA device (the suite records it and stops)"
if (( ST & 4 )); then
    log "timm missing: pip install timm==1.0.31 (quiet, 90 s at most)"
    timeout 90 $PY -m pip install -q --retries 0 --timeout 15 timm==1.0.31 >> "$SETUP" 2>&1 \
        && log "pip install timm==1.0.31: done" || log "FAILED: pip install timm==1.0.31 (offline?)"
    DRY=$DRY $PY -c "$CHECK" >> "$SETUP" 2>&1
    ST=$?
    (( ST & 4 )) && fail "no timm, and pip could not install it"
fi
(( ST & 8 )) && fail "evoplug (or its dependency tqdm) does not import"

# --- the suite, under a hard limit ----------------------------------------------------------
LEFT=$(( HARD_S - ($(date +%s) - START) ))
ARGS=(--out "$OUT" --budget-s "$BUDGET_S" --start "$START")
[ "$DRY" = 0 ] || ARGS+=(--dry)
[ -z "$BUNDLE" ] || ARGS+=(--bundle "$BUNDLE")
# shellcheck disable=SC2206  # word splitting wanted: extra options of gpu_suite.py
[ -z "${SUITE_ARGS:-}" ] || ARGS+=($SUITE_ARGS)
log "+ $PY benchmarks/gpu_suite.py ${ARGS[*]}   (interrupted after $LEFT s)"
timeout -s INT -k 20 "$LEFT" $PY -u benchmarks/gpu_suite.py "${ARGS[@]}" 2>&1 | tee "$OUT/run.log"
RC=${PIPESTATUS[0]}
case $RC in
    0) log "suite finished in $(( $(date +%s) - START )) s";;
    124|130|137)
        log "suite STOPPED by the hard limit (exit $RC) after $(( $(date +%s) - START )) s"
        grep -q "Stopped from outside" "$OUT/summary.md" 2>/dev/null \
            || printf '\n**Stopped by the hard limit (exit %s)**: the last unit started in run.log has no figures.\n' \
                      "$RC" >> "$OUT/summary.md";;
    *) log "suite FAILED (exit $RC): see run.log";;
esac
[ -z "$BUNDLE" ] || log "bundle: $BUNDLE/gpu_results.tar.gz (all of $OUT), summary.md, run.log, setup.txt"
exit $RC
