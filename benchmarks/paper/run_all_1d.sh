#!/usr/bin/env bash
# The four 1D paper runs (ε ∈ {1/15, 0.01} × {ms_pinn, hybrid}), one at a time, one thread,
# at nice 19 (idle cycles only on a shared machine), with checkpoints. Usage:
#   benchmarks/paper/run_all_1d.sh [STEPS] [OUT] [LOGS] [CHUNK]
# The two methods of one ε advance in turns, CHUNK steps at a time (each turn resumes from the
# run's checkpoint), ε = 1/15 first: stopped at any moment (SIGTERM writes a checkpoint), the two
# methods of an ε stand at about the same step, and the script continues where it was
# when started again. With LANES=2 in the environment the two ε run side by side instead.
set -u
cd "$(dirname "$0")/../.."
STEPS=${1:-10000}
OUT=${2:-benchmarks/results/paper/runs}
LOGS=${3:-/work/scratch/paper}
CHUNK=${4:-1000}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$LOGS"
run() {  # method eps tag target (skipped when the saved run is there already)
    local done
    done=$(sed -n 's/.*"steps_done": \([0-9]*\).*/\1/p' "$OUT/$1_$3/meta.json" 2>/dev/null)
    [ "${done:-0}" -ge "$4" ] && return 0
    OMP_NUM_THREADS=1 nice -n 19 "$PY" benchmarks/paper/reproduce_1d.py --method "$1" --eps "$2" \
        --steps "$4" --out "$OUT" --resume >>"$LOGS/$1_$3.log" 2>&1
    local rc=$?
    echo "$(date '+%F %T') $1 $3 to $4 exit $rc" >>"$LOGS/lanes.log"
    return $rc
}
pair() {  # eps tag: both methods in turns up to STEPS
    local target=$CHUNK
    while :; do
        [ "$target" -gt "$STEPS" ] && target=$STEPS
        run ms_pinn "$1" "$2" "$target" || return
        run hybrid "$1" "$2" "$target" || return
        [ "$target" -ge "$STEPS" ] && return
        target=$((target + CHUNK))
    done
}
if [ "${LANES:-1}" = 2 ]; then
    pair 1/15 eps1_15 &
    pair 0.01 eps0.01 &
    wait
else
    pair 1/15 eps1_15 && pair 0.01 eps0.01
fi
