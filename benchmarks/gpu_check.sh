#!/usr/bin/env bash
# The prepared GPU check: benchmarks/gpu_check.sh OUT_DIR [--cpu]
#
# On the GPU machine (python3.12, torch 2.11 CUDA 13, Triton 3.6, no package index), from the
# repository root, with .whl/ carried (../shared/device/wheelhouse.sh fills it): installs the
# wheels into /tmp/site, then runs each part of benchmarks/gpu_check.py under its own timeout
# (7.5 minutes in all, well inside an 8-minute limit). Everything goes to OUT_DIR: gpu_check.log,
# gpu_check.json, gpu_check.md (3 files). --cpu: every part at tiny sizes on the CPU (CI).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--cpu]}
MODE=${2:-}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.md"
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
export PYTHONUNBUFFERED=1
if [ "$MODE" = "--cpu" ]; then
  PY=${PYTHON:-$HERE/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # fused kernels in Triton's interpreter
  EXTRA=--cpu
  # part: seconds (tiny sizes; torch.compile on 2 cores dominates)
  LIMITS="ceiling:30 precision:120 train:120 e2e:120 quality:30 ddp:120 knn:60 search:60"
else
  PY=python3
  EXTRA=
  if ls .whl/*.whl >/dev/null 2>&1; then
    start=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; exit 1; }
    echo "wheels installed in $(( $(date +%s) - start )) s" | tee -a "$LOG"
    export PYTHONPATH=/tmp/site:$HERE
  else
    echo "no .whl/ here: run ../shared/device/wheelhouse.sh first and carry .whl" | tee -a "$LOG"
    export PYTHONPATH=$HERE
  fi
  nvidia-smi >>"$LOG" 2>&1
  # part: seconds, 460 in all (+ ~30 s install): the priority order of the issues
  LIMITS="ceiling:20 precision:60 train:180 e2e:60 quality:60 ddp:25 knn:15 search:40"
fi
for item in $LIMITS; do
  part=${item%%:*}; limit=${item##*:}
  echo "=== $part (limit ${limit}s) ===" >>"$LOG"
  timeout -k 5 "$limit" "$PY" benchmarks/gpu_check.py "$OUT" $EXTRA --parts "$part" >>"$LOG" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "$part: exit $rc$( [ $rc -ge 124 ] && echo ' (timed out)')" | tee -a "$LOG"
    printf '\n## %s: exit %s (timeout %ss or crash; see gpu_check.log)\n' "$part" "$rc" "$limit" >>"$OUT/gpu_check.md"
  fi
done
grep -E '^[a-z0-9]+: ' "$LOG" | tail -n 20
echo "results: $OUT/gpu_check.json $OUT/gpu_check.md $OUT/gpu_check.log"
