#!/usr/bin/env bash
# The GPU check of issue 17, for the device machine (no DOLFINx there; PyTorch, NumPy, mpi4py):
#   bash benchmarks/paper/gpu_run.sh [more gpu_run.py options]
# Writes gpu_run.json, gpu_run.log, nvidia-smi.txt (and pytest.log when DOLFINx is there) into
# $OUT (else benchmarks/results/paper/gpu). The script's own budget is 420 s and `timeout`
# stops it at 460 s, so the whole call stays under 8 minutes and a rerun fits in 15.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/results/paper/gpu}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1 || true
timeout -k 10 460 "$PY" benchmarks/paper/gpu_run.py --device cuda --budget 420 --runs-f32 \
    --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_run.log"
exit "${PIPESTATUS[0]}"
