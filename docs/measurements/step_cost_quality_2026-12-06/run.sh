#!/bin/bash
# step cache quality (the default magcache 0.3, against no cache) on the bundled checkpoint, seeds 11, 13, 19.
# usage: run.sh OUT_DIR. Ran as `run.sh /work/q/sq` on the checkpoint shipped 2026-12-06 evening (frame_norm,
# framenorm_*) and as `run.sh /work/q/sq2` on the one shipped that night (step 2000, step2000_*)
set -e
OUT=${1:?usage: run.sh OUT_DIR}
mkdir -p "$OUT"
cd /work/main
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/work/main
for S in 11 13 19; do
  python jobs/evaluate.py --seed $S --effects combo-eval --refs-per-effect 8 --no-per-effect --output $OUT/$S-none --step-cache none > $OUT/$S-none.log 2>&1
  python jobs/evaluate.py --seed $S --effects combo-eval --refs-per-effect 8 --no-per-effect --output $OUT/$S-mag0.3 --step-cache magcache --against $OUT/$S-none > $OUT/$S-mag0.3.log 2>&1
  echo "seed $S done $(date)"
done
